"""The MID's MQTT broker in the demo: Mosquitto as the MID runs it, or, only where Mosquitto is not installed, an
embedded Python broker (amqtt), and the demo says which.

Mosquitto runs from the files `midgate coordinator broker-config` writes: the device-facing TLS listener with the
MID's CA (every enrolment grant names it), password logins with per-device ACLs, and a plain listener on loopback for
the coordinator (docs/messaging.md). The embedded broker has none of that: one plain loopback listener, anonymous,
no ACL, MQTT 3.1.1 only, so the coordinator connects with MQTT 3.1.1 and grants tell devices to connect in plain TCP.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from coordinator.federation.superlink_process import free_loopback_port

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerKind(StrEnum):
    MOSQUITTO = "mosquitto"
    EMBEDDED = "embedded"


def find_mosquitto() -> str | None:
    """The mosquitto binary `make test` installs (Debian's package puts it in /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).is_file()), None)


def find_embedded() -> str | None:
    """amqtt's broker command: installed beside this interpreter (what `make demo` does when apt cannot install
    Mosquitto), else on PATH; or None."""
    beside = Path(sys.executable).with_name("amqtt")
    return str(beside) if beside.is_file() else shutil.which("amqtt")


@dataclass(frozen=True)
class BrokerPlan:
    """Which broker the demo runs and on which loopback ports.

    device_port: the port devices' grants name (Mosquitto: its TLS listener; embedded: its only listener).
    local_port: the port the coordinator connects to (Mosquitto: its plain loopback listener).
    """

    kind: BrokerKind
    device_port: int
    local_port: int
    executable: str

    @classmethod
    def choose(cls, wanted: str) -> BrokerPlan:
        """`wanted`: "auto" (Mosquitto when installed, else embedded), "mosquitto" or "embedded". Raises
        LookupError naming what to install when the broker asked for is missing."""
        mosquitto = find_mosquitto()
        if wanted in ("auto", "mosquitto") and mosquitto:
            return cls(BrokerKind.MOSQUITTO, free_loopback_port(), free_loopback_port(), mosquitto)
        if wanted == "mosquitto":
            raise LookupError("mosquitto is not installed: `sudo apt-get install mosquitto` (what `make demo` runs)")
        amqtt = find_embedded()
        if amqtt is None:
            raise LookupError(
                "neither Mosquitto nor the embedded broker is installed: `sudo apt-get install mosquitto`, or "
                "`pip install amqtt` for the embedded one (`make demo` does one or the other)"
            )
        port = free_loopback_port()
        return cls(BrokerKind.EMBEDDED, port, port, amqtt)

    @property
    def mqtt_protocol(self) -> str:
        """What devices speak to this broker (agent.toml `mqtt_protocol`)."""
        return "auto" if self.kind is BrokerKind.MOSQUITTO else "3.1.1"

    def coordinator_toml(self, broker_dir: Path) -> str:
        """coordinator.toml's `[broker]` and `[broker_config]` tables for this broker."""
        if self.kind is BrokerKind.MOSQUITTO:
            return (
                "[broker]\n"
                "# The coordinator on Mosquitto's plain loopback listener; devices on its TLS listener below, which\n"
                "# every enrolment grant names with the MID's CA.\n"
                'host = "127.0.0.1"\n'
                f"port = {self.local_port}\n"
                "[broker_config]\n"
                f'output_dir = "{broker_dir}"\n'
                f'user = "{_account()}"\n'
                'listen_host = "127.0.0.1"\n'
                f"tls_port = {self.device_port}\n"
                f"local_port = {self.local_port}\n"
                'tls_hostnames = ["127.0.0.1", "localhost"]\n'
            )
        return (
            "[broker]\n"
            "# The embedded broker: one plain loopback listener, MQTT 3.1.1, no logins or ACLs.\n"
            'host = "127.0.0.1"\n'
            f"port = {self.local_port}\n"
            "mqtt5 = false\n"
            "public_tls = false\n"
            f"public_port = {self.device_port}\n"
            "[broker_config]\n"
            f'output_dir = "{broker_dir}"\n'
        )

    def argv(self, broker_dir: Path) -> list[str]:
        """The broker's command line (after `broker-config` for Mosquitto; `embedded_config` for amqtt)."""
        if self.kind is BrokerKind.MOSQUITTO:
            return [self.executable, "-c", str(broker_dir / "mosquitto.conf")]
        return [self.executable, "-c", str(broker_dir / "amqtt.yaml")]

    def embedded_config(self, broker_dir: Path) -> Path:
        broker_dir.mkdir(parents=True, exist_ok=True)
        path = broker_dir / "amqtt.yaml"
        path.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: 127.0.0.1:{self.device_port}\n"
            "plugins:\n"
            "  amqtt.plugins.logging_amqtt.EventLoggerPlugin:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        return path


def _account() -> str:
    """The account Mosquitto runs as: this one (run as root, it would drop to user `mosquitto`, which cannot enter
    the demo's private folder)."""
    import os
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
