"""`agent.toml`: the member daemon's settings, one model, TOML + `MIDGATE_AGENT_*` env overrides.

Example:

    data_dir = "/var/lib/midgate-agent"
    heartbeat_s = 60
    outbox_max_bytes = 268435456

    [[sensors]]
    driver = "replay"
    path = "/home/ann/recordings/kitchen.csv"
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.sensors.config import SampleStoreConfig, SensorConfig
from edge.sensors.export import WindowSource
from protocol.settings import RoleSettings


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_HUB_PASSWORD_FILE = 4096


class HubRoute(BaseModel):
    """`[[via_hub]]`: reach one MID's broker through a Pi hub's Mosquitto at home, whose bridge carries this device's
    messages to the MID (deploy/raspberrypi/README.md, "The bridge to your MID"). The device logs in to the hub with
    its device id and the password the hub's installer made for it (`install.sh --hub --hub-device ID`)."""

    model_config = ConfigDict(extra="forbid")

    mid: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="the MID whose messages go through the hub")
    host: str = Field(min_length=1, max_length=253, description="the hub's address on the home network")
    port: int = Field(default=1883, ge=1, le=65535, description="the hub's Mosquitto listener")
    password_file: Path = Field(description="file holding this device's password on the hub's Mosquitto")

    def password(self) -> str:
        """The first line of `password_file`; ValueError saying what is wrong with the file otherwise."""
        try:
            with self.password_file.open("rb") as file:
                text = file.read(MAX_HUB_PASSWORD_FILE + 1)
        except OSError as error:
            raise ValueError(f"[[via_hub]] {self.mid}: cannot read {self.password_file}: {error.strerror}") from None
        lines = text.decode(errors="replace").splitlines()
        password = lines[0].strip() if lines else ""
        if len(text) > MAX_HUB_PASSWORD_FILE or not 16 <= len(password) <= 128:
            raise ValueError(f"[[via_hub]] {self.mid}: {self.password_file} holds no password of 16-128 characters")
        return password


class AgentSettings(RoleSettings):
    """The member daemon: where it keeps its state, how it talks MQTT, its outbox bounds, its sensors."""

    ENV_PREFIX = "MIDGATE_AGENT_"

    data_dir: Path = Field(
        default=Path("agent-data"), description="keys, memberships, outboxes; keep it private to the agent (0700)"
    )
    spool_dir: Path | None = Field(
        default=None, description="where the ClientApp drops contribution records; default data_dir/spool"
    )
    min_job_windows: int = Field(
        default=10,
        ge=1,
        description="a job invitation is declined when the sample store gives fewer windows of the job's task",
    )
    max_job_windows: int | None = Field(
        default=100_000, ge=1, description="at most this many windows (the oldest first) go into one job; none: all"
    )
    sensor_health_s: float = Field(
        default=5.0, gt=0, description="seconds between writes of each sensor's rate, last sample and errors"
    )
    flower_acceleration: bool = Field(
        default=True,
        description="run the SuperNode of a job accelerated: forked from the warm executor (keep_warm_executor) or "
        "as one process, with the SuperExec's 0.2 s task poll and ClientApps that wait for their message "
        "(edge.federated.acceleration); false: Flower's own device processes "
        '(docs/federated.md, "Flower acceleration")',
    )
    keep_warm_executor: bool = Field(
        default=True,
        description="with flower_acceleration: start the warm executor (torch, Flower and the ClientApp imported; "
        "no Flower process, no connection; about 225 MB of memory) with the agent and keep it between jobs, so a "
        "job's SuperNode starts at once instead of after the imports (6 s of CPU per device measured), and fork each "
        "job's SuperNode and ClientApps from it; false: each job runs as one process (midgate-supernode "
        "--clientapp-threads: the SuperNode imports torch and the ClientApp, its SuperExec and ClientApps are "
        "threads), the least memory a job takes (292 MB PSS for the device against 418, BENCHMARKS.md)",
    )
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="MQTT version; auto tries 5 and falls back to 3.1.1"
    )
    keepalive_s: int = Field(default=60, ge=5, le=3600, description="MQTT keepalive in seconds")
    heartbeat_s: float = Field(default=60.0, gt=0, description="seconds between signed heartbeats")
    spool_poll_s: float = Field(default=0.5, gt=0, description="seconds between scans of the spool directory")
    member_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="seconds between checks of each membership's member.json (pause, leave, strike commands)",
    )
    # A report without a receipt after this long is published again, then with exponential backoff and jitter.
    resend_after_s: float = Field(
        default=15.0, gt=0, description="resend a report without a verified receipt after this many seconds"
    )
    resend_max_s: float = Field(default=600.0, gt=0, description="upper bound of the resend backoff, seconds")
    publish_batch: int = Field(default=200, ge=1, description="reports taken from the outbox per publish pass")
    max_inflight: int = Field(default=100, ge=1, le=65535, description="QoS 1 publishes awaiting PUBACK at once")
    outbox_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=64 * 1024, description="disk bound of each outbox; new records wait beyond it"
    )
    outbox_warn_fraction: float = Field(
        default=0.8, gt=0, le=1, description="warn when an outbox reaches this fraction of its bound"
    )
    witness_every_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds between cosignatures: the agent checks the checkpoint its MID asks witnesses to cosign "
        "against its own trusted one, and cosigns it (docs/ledger.md, Witnesses)",
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, description="first reconnect delay after losing the broker")
    reconnect_max_s: float = Field(default=120.0, gt=0, description="upper bound of the reconnect backoff")
    member_page_port: int | None = Field(
        default=8490,
        ge=0,
        le=65535,
        description="port of the member page `agent run` serves (statement, receipts, earnings: edge/agent/"
        "member_page.py); 0 picks a free one, none: off. The address is written to data_dir/member-page.url",
    )
    member_page_host: str = Field(
        default="127.0.0.1",
        description="address the member page listens on; anything but loopback also needs member_page_home_network",
    )
    member_page_home_network: bool = Field(
        default=False,
        description="let the member page listen beyond loopback (e.g. a Pi hub's owner opening it from the home "
        "network); it has no login, so whoever reaches the address reads the member's earnings",
    )
    # `[[sensors]]` and `[sample_store]` are the sensors component's own models (edge.sensors.config).
    sensors: list[SensorConfig] = Field(
        default_factory=list,
        description="`[[sensors]]` tables, one per sensor, sampled by `agent run` into the sample store "
        "(docs/sensors.md)",
    )
    via_hub: list[HubRoute] = Field(
        default_factory=list,
        description="`[[via_hub]]` tables: MIDs whose broker this device reaches through a Pi hub at home "
        "(mid, host, port = 1883, password_file) rather than directly; plain MQTT on the home network, each message "
        "still signed",
    )
    # A relative `sample_store.path` is under data_dir: the store is the member's data and stays in the agent's
    # private folder, wherever the daemon was started from.
    sample_store: SampleStoreConfig = Field(default_factory=SampleStoreConfig)

    @model_validator(mode="after")
    def _sensing(self) -> Self:
        names = [s.name for s in self.sensors]
        if len(set(names)) != len(names):
            raise ValueError(f"[[sensors]] names must be unique, found {names}")
        mids = [route.mid for route in self.via_hub]
        if len(set(mids)) != len(mids):
            raise ValueError(f"[[via_hub]] names each MID once, found {mids}")
        if not self.member_page_home_network and not is_loopback(self.member_page_host):
            raise ValueError(
                f"member_page_host {self.member_page_host!r} is not loopback: set member_page_home_network = true to "
                "serve the member page beyond this machine"
            )
        if not self.sample_store.path.is_absolute():
            self.sample_store = self.sample_store.model_copy(update={"path": self.data_dir / self.sample_store.path})
        return self

    @property
    def window_source(self) -> WindowSource:
        """Where the windows of a job this agent is invited to come from."""
        return WindowSource(self.sample_store.path, self.min_job_windows, self.max_job_windows)

    @property
    def spool_root(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    def hub_route(self, mid: str) -> HubRoute | None:
        return next((route for route in self.via_hub if route.mid == mid), None)

    def membership_dir(self, mid: str) -> Path:
        return self.data_dir / "mids" / mid
