"""deploy/raspberrypi/install.sh end to end in a throwaway Debian bookworm root (tests/debian_root.py), offline from a
local wheel of this checkout and a wheelhouse with the pinned CPU torch: install (twice: nothing changes), hub mode
with a login and a [[sensors]] table per small sensor (a re-run adds a sensor and keeps the first one's password), enrol
the installed agent against a real coordinator and Mosquitto and have it deliver a signed KnobUpdate with a verified
receipt; `--upgrade` keeps keys, config and outbox; a broken upgrade is rolled back; `--uninstall --purge-data`
leaves the root as it was. The agent runs inside the root as the `midgate` user, on the host's network."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from debian_root import REPO, debian_root, missing_tools, project_wheels
from mqtt_fixtures import MessagingStack, ServiceProcess, wait_until

pytest_plugins = ["mqtt_fixtures"]

MID = "riverside"
INSTALLER = "/opt/midgate/deploy/install.sh"
MIDGATE = "/opt/midgate/venv/bin/midgate"
CONF = "/etc/midgate/agent.toml"
# Paths a package manager, a log or the interpreter may touch while the installer runs; nothing of midgate.
UNTRACKED = ("proc", "dev", "tmp", "var/log", "var/cache", "var/lib/apt", "var/lib/dpkg", "run", "etc/.pwd.lock")

# Measured on the 2-core CI machine beside other tests: install 3-4 min (torch and Flower unpacked into the venv),
# each upgrade 1-2 min (a copy of the venv kept for roll-back, pip's resolve), the rest well under a minute.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
]


CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
AS_MIDGATE = ("setpriv", "--reuid=midgate", "--regid=midgate", "--init-groups", "--")


class ChrootAgent(ServiceProcess):
    """The installed unit's ExecStart (`midgate-agent --config ...`) inside the root as the midgate user (chroot and
    setpriv exec: the PID is the agent's)."""

    def __init__(self, root: Path, log_path: Path) -> None:
        super().__init__("agent-pi", [], log_path)
        self.root = root

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["chroot", str(self.root), *AS_MIDGATE, *unit_exec_start(self.root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=CLEAN_ENV,
            )


def unit_exec_start(root: Path) -> list[str]:
    """The command the installed systemd unit starts."""
    unit = (root / "etc/systemd/system/midgate-agent.service").read_text()
    return next(line for line in unit.splitlines() if line.startswith("ExecStart=")).removeprefix("ExecStart=").split()


def run_in(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = subprocess.run(["chroot", str(root), *args], capture_output=True, text=True, env=CLEAN_ENV, timeout=900)
    print(f"{' '.join(args)[:100]}: exit {done.returncode} after {time.monotonic() - started:.0f} s")
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def tree(root: Path) -> set[str]:
    """Every path under root, but the ones in UNTRACKED."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel, d)) not in UNTRACKED]
        found.update(os.path.normpath(os.path.join(rel, n)) for n in (*dirnames, *filenames))
    return {p for p in found if not p.endswith("-") and "__pycache__" not in p}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def receipted_reports(root: Path) -> int:
    db = sqlite3.connect(f"file:{root}/var/lib/midgate/mids/{MID}/outbox.sqlite?mode=ro", uri=True, timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM receipts WHERE kind IS NOT 'enrol'").fetchone()[0])
    finally:
        db.close()


def broken_wheel(wheel: Path, out: Path) -> Path:
    """The same wheel with `agent run`'s daemon module failing at import: an upgrade whose health check fails."""
    broken = out / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(broken, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "edge/agent/daemon.py":
                data += b"\nraise ImportError('a broken release')\n"
            dst.writestr(item, data)
    return broken


def check_hub(root: Path, installer: str, offline: tuple[str, ...]) -> None:
    """`--hub --hub-sensor kitchen` writes the hub's Mosquitto config with a login per sensor readable by the right
    users only, and the sensor's [[sensors]] table; a re-run with a new sensor and the bridge's settings keeps the
    first one's password and table, adds the second's, and fills in the bridge. (tests/test_hub_mosquitto.py runs
    what hub-mosquitto.sh writes in a real Mosquitto.)"""
    hub = run_in(root, installer, *offline, "--hub", "--hub-sensor", "kitchen")
    secrets = root / "etc/midgate/hub"
    kitchen_password = (secrets / "kitchen.secret").read_text().strip()
    assert f"hub sensor kitchen: login kitchen, password {kitchen_password}" in hub.stdout
    assert "listener 1883 127.0.0.1" in (root / "etc/mosquitto/conf.d/midgate-hub.conf").read_text()
    groups = {line.split(":")[2]: line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()}
    for path, mode, group in [
        (secrets / "agent.secret", 0o640, "midgate"),
        (secrets / "kitchen.secret", 0o600, "root"),
        (root / "etc/mosquitto/midgate-hub/midgate-hub.passwd", 0o640, "mosquitto"),
    ]:
        assert (path.stat().st_mode & 0o777, groups[str(path.stat().st_gid)]) == (mode, group), path
    assert (root / "etc/midgate/mosquitto-hub-bridge.conf").exists()  # the bridge waits to be filled in
    (root / "tmp/hub-password").write_text("p&ss|w/rd\n")  # characters sed or bash 5.2 would take as syntax
    (root / "tmp/mid-ca.pem").write_text("a CA\n")
    two = ("--hub", "--hub-sensor", "kitchen", "--hub-sensor", "hall", "--hub-device", LAPTOP)
    bridge = ("--bridge", "mid.example:8883", "--bridge-login", "relay.home")
    bridge += ("--bridge-password-file", "/tmp/hub-password")
    second = run_in(root, installer, *offline, *two, *bridge, "--bridge-ca", "/tmp/mid-ca.pem")
    # Another midgate device at home: its login on the hub, held to its own topics, and how its agent names the hub.
    laptop_password = (secrets / f"{LAPTOP}.secret").read_text().strip()
    assert f"hub device {LAPTOP}: login {LAPTOP}, password {laptop_password}; in its agent.toml:" in second.stdout
    assert "[[via_hub]]" in second.stdout and "rerun with --hub-lan" in second.stdout
    assert (secrets / f"{LAPTOP}.secret").stat().st_mode & 0o777 == 0o600
    hub_acl = (root / "etc/mosquitto/midgate-hub/midgate-hub.acl").read_text()
    assert f"user {LAPTOP}\ntopic write mid/+/dev/{LAPTOP}/up/#\n" in hub_acl
    bridged = (root / "etc/mosquitto/conf.d/midgate-bridge.conf").read_text()
    for line in (
        "address mid.example:8883",
        "remote_username relay.home",
        "remote_password p&ss|w/rd",
        "bridge_cafile /etc/mosquitto/midgate-hub/mid-ca.pem",
        "topic mid/+/dev/+/up/# out 1",
    ):
        assert f"\n{line}\n" in bridged, bridged
    assert "sensors" not in bridged.split("connection midgate-mid")[1]  # readings are never bridged
    assert not (root / "etc/midgate/mosquitto-hub-bridge.conf").exists()
    toml = (root / CONF.lstrip("/")).read_text()
    assert toml.count('driver = "mqtt"') == 2 and 'topic = "sensors/hall/state"' in toml
    assert (secrets / "kitchen.secret").read_text().strip() == kitchen_password
    # The agent (as the midgate user) reads its config with both tables and its password on the hub's broker.
    run_in(root, *AS_MIDGATE, "/opt/midgate/venv/bin/python", "-c", READS_HUB_CONFIG)


LAPTOP = "d-3f2a9c0b1e4d5f60"

READS_HUB_CONFIG = f"""
from pathlib import Path
from edge.agent.config import AgentSettings
from edge.sensors.config import build_sensor
sensors = [build_sensor(s) for s in AgentSettings.load(Path("{CONF}")).sensors if s.driver == "mqtt"]
assert [s.name for s in sensors] == ["kitchen", "hall"] and all(s.password for s in sensors)
"""


@pytest.fixture
def pi_root(tmp_path: Path) -> Iterator[Path]:
    with debian_root(tmp_path) as root:
        yield root


def test_install_enrol_report_upgrade_rollback_uninstall(
    pi_root: Path, messaging_stack: MessagingStack, tmp_path: Path
) -> None:
    root = pi_root
    wheel, wheelhouse = project_wheels(tmp_path / "dist")
    # Mosquitto as the member's apt would install it for --hub; --uninstall leaves Debian's packages alone.
    run_in(root, "apt-get", "update", "-qq")
    run_in(root, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "mosquitto")
    before = tree(root)
    (root / "tmp/dist").mkdir()
    subprocess.run(["cp", "-a", str(wheel), str(wheelhouse), str(REPO / "deploy/raspberrypi"), f"{root}/tmp/dist/"])
    installer = "/tmp/dist/raspberrypi/install.sh"
    offline = ("--wheel", f"/tmp/dist/{wheel.name}", "--wheelhouse", "/tmp/dist/wheelhouse")

    first = run_in(root, installer, *offline)
    assert "midgate agent enrol" in first.stdout
    conf = root / CONF.lstrip("/")
    assert "keep_warm_executor = false" in conf.read_text() and "bme280" not in conf.read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/midgate-agent.service").is_symlink()
    assert (root / "var/lib/midgate").stat().st_mode & 0o777 == 0o700
    # What a job runs with the Pi's keep_warm_executor = false: midgate-supernode, beside the agent's own command.
    supernode = str(Path(unit_exec_start(root)[0]).with_name("midgate-supernode"))
    assert "usage: midgate-supernode" in run_in(root, *AS_MIDGATE, supernode, "--help").stdout
    conf_digest = digest(conf)
    again = run_in(root, installer, *offline)
    assert f"keeping {CONF}" in again.stdout and "keeping the installed midgate" in again.stdout
    assert digest(conf) == conf_digest
    check_hub(root, installer, offline)

    # The member page of the agent in the root listens on the host's network: a free port, not 8490.
    conf.write_text("member_page_port = 0\n" + conf.read_text())
    messaging_stack.start_broker()
    messaging_stack.start_coordinator()
    token = messaging_stack.invite("pi")
    url = f"http://127.0.0.1:{messaging_stack.http_port}"
    run_in(root, *AS_MIDGATE, MIDGATE, "agent", "enrol", "--config", CONF, "--mid", url, "--invite", token)
    agent = ChrootAgent(root, tmp_path / "agent.log")
    try:
        agent.start()
        run_in(root, *AS_MIDGATE, MIDGATE, "agent", "knob", "set", "0.5", "--config", CONF)
        wait_until(lambda: receipted_reports(root) >= 1 or not agent.alive, 120, "the KnobUpdate's receipt")
        assert agent.alive
    except BaseException:
        print(f"---- agent in the root (tail) ----\n{agent.log_text()[-8000:]}")
        raise
    finally:
        agent.stop()
    assert receipted_reports(root) == 1

    kept = {p: digest(root / p) for p in ("etc/midgate/agent.toml", f"var/lib/midgate/mids/{MID}/device.key")}
    upgraded = run_in(root, INSTALLER, "--upgrade", *offline)
    assert "`midgate-agent` is ready" in upgraded.stdout + upgraded.stderr
    assert {p: digest(root / p) for p in kept} == kept and receipted_reports(root) == 1

    daemon_py = next((root / "opt/midgate/venv/lib").glob("python3*/site-packages/edge/agent/daemon.py"))
    good = digest(daemon_py)
    (root / "tmp/dist/broken").mkdir()
    bad = broken_wheel(wheel, root / "tmp/dist/broken")
    rolled = run_in(root, INSTALLER, "--upgrade", "--wheel", f"/tmp/dist/broken/{bad.name}", *offline[2:], check=False)
    assert rolled.returncode != 0 and "rolled back" in rolled.stderr, rolled.stdout + rolled.stderr
    assert digest(daemon_py) == good and not (root / "opt/midgate/venv.previous").exists()
    assert {p: digest(root / p) for p in kept} == kept and receipted_reports(root) == 1

    run_in(root, INSTALLER, "--uninstall")
    assert (root / f"var/lib/midgate/mids/{MID}/device.key").exists()  # the member's data stays unless asked
    run_in(root, "/tmp/dist/raspberrypi/install.sh", "--uninstall", "--purge-data")
    subprocess.run(["rm", "-rf", f"{root}/tmp/dist"], check=True)
    assert tree(root) ^ before == set()
    assert "midgate" not in (root / "etc/passwd").read_text()
