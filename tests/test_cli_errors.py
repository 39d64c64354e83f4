"""Expected errors end a `midgate` command with one line on stderr and a non-zero exit, never a traceback, and never
a secret: the console script (midgate_cli.MidgateApp) run in-process as the member or operator types it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from mqtt_fixtures import free_port

from coordinator.mid_key import mid_key_name
from midgate_cli import app
from protocol.identity import SignerKey

SECRET = "hunter2-never-print-me"


def _midgate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ended:
        app(list(args), prog_name="midgate")
    out, err = capsys.readouterr()
    code = ended.value.code
    if isinstance(code, str):  # what the interpreter does with SystemExit("message"): print it, exit 1
        return 1, out, err + code + "\n"
    return (code if isinstance(code, int) else 0), out, err


def _one_line(err: str) -> str:
    assert "Traceback" not in err and "╭" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def coordinator_config(tmp_path: Path) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(f'mid = "riverside"\ndata_dir = "{tmp_path / "data"}"\n[federation]\nenabled = true\n')
    return path


class _MidInfo(BaseHTTPRequestHandler):
    """A MID endpoint that answers /v1/info and nothing else."""

    def do_GET(self) -> None:
        body = f'{{"mid": "riverside", "mid_key": "{MID_KEY.verifier.text()}"}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


MID_KEY = SignerKey.generate(mid_key_name("riverside"))


@pytest.fixture
def mid_endpoint() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _MidInfo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.mark.parametrize(
    "command",
    [
        ["agent", "status"],
        ["agent", "run"],
        ["coordinator", "devices"],
        ["coordinator", "serve"],
        ["coordinator", "job", "list"],
    ],
)
def test_a_missing_config_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]) -> None:
    code, _, err = _midgate(capsys, *command, "--config", str(tmp_path / "nope.toml"))
    assert code == 1
    assert _one_line(err) == f"error: config file {tmp_path / 'nope.toml'} not found"


def test_an_invalid_config_says_where_and_what_but_never_the_values(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(f'mid = "riverside"\n[broker]\nport = 99999\npassword = "{SECRET}"\nusername = 7\n')
    code, out, err = _midgate(capsys, "coordinator", "devices", "--config", str(config))
    line = _one_line(err)
    assert code == 2
    assert line.startswith("error: invalid config: broker.port: Input should be less than or equal to 65535")
    assert "broker.password: Extra inputs are not permitted" in line
    assert SECRET not in out + err and "99999" not in line


def test_an_unreachable_mid_and_a_bad_invite_token_are_one_line_and_the_token_is_never_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mid_endpoint: str
) -> None:
    agent = tmp_path / "agent.toml"
    agent.write_text(f'data_dir = "{tmp_path / "agent"}"\n')
    token = "A" * 86  # the right length, not the MID's signature
    unreachable = f"http://127.0.0.1:{free_port()}"
    code, out, err = _midgate(capsys, "agent", "enrol", "--mid", unreachable, "--invite", token,
                              "--config", str(agent))  # fmt: skip
    assert code == 1 and _one_line(err).startswith("error: cannot reach the server: ")
    assert token not in out + err

    code, out, err = _midgate(
        capsys, "agent", "enrol", "--mid", mid_endpoint, "--invite", token, "--config", str(agent)
    )
    assert code == 1 and _one_line(err).startswith("error: invite_invalid: ")
    assert token not in out + err


def test_an_unknown_job_and_an_unknown_member_id_are_one_line(
    capsys: pytest.CaptureFixture[str], coordinator_config: Path
) -> None:
    code, _, err = _midgate(capsys, "coordinator", "job", "show", "job-404", "--config", str(coordinator_config))
    assert (code, _one_line(err)) == (1, "no job job-404")
    code, _, err = _midgate(capsys, "coordinator", "job", "settle", "job-404", "--payment", "100", "--currency", "EUR",
                            "--config", str(coordinator_config))  # fmt: skip
    assert (code, _one_line(err)) == (2, "settlement refused: no such job")
    code, _, err = _midgate(capsys, "coordinator", "invite", "Not_An_Id", "--config", str(coordinator_config))
    assert code == 1 and _one_line(err).startswith("error: bad_topic: member must be")


def test_a_job_without_a_running_coordinator_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, coordinator_config: Path
) -> None:
    validation = tmp_path / "validation.npz"
    validation.write_bytes(b"")
    code, _, err = _midgate(capsys, "coordinator", "job", "start", "job-1", "--task", "plaid-appliance@1",
                            "--validation", str(validation), "--purpose", "research", "--buyer", "acme",
                            "--config", str(coordinator_config))  # fmt: skip
    assert code == 1 and _one_line(err).startswith("job failed: ")
    code, _, err = _midgate(capsys, "coordinator", "job", "start", "job-1", "--task", "plaid-appliance@1",
                            "--validation", str(validation), "--purpose", "Research!", "--buyer", "acme",
                            "--min-nodes", "0", "--config", str(coordinator_config))  # fmt: skip
    assert code == 2
    assert _one_line(err) == (
        "job refused: min_nodes: Input should be greater than or equal to 1;"
        " purpose: String should match pattern '^[a-z0-9][a-z0-9-]{0,62}$'"
    )
    # A purpose outside the MID policy's vocabulary (issue 18): refused before anything starts.
    code, _, err = _midgate(capsys, "coordinator", "job", "start", "job-1", "--task", "plaid-appliance@1",
                            "--validation", str(validation), "--purpose", "surveillance", "--buyer", "acme",
                            "--config", str(coordinator_config))  # fmt: skip
    assert code == 2 and _one_line(err).startswith("job refused: policy_violation: purpose not in the MID's vocabulary")


def test_agent_commands_without_a_membership_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    agent = tmp_path / "agent.toml"
    agent.write_text(f'data_dir = "{tmp_path / "agent"}"\n')
    code, _, err = _midgate(capsys, "agent", "status", "--config", str(agent))
    assert code == 2 and _one_line(err).startswith("no memberships under ")
    code, _, err = _midgate(capsys, "agent", "run", "--config", str(agent))
    assert code == 1 and _one_line(err).startswith("no memberships under ")


def test_empty_lists_say_so(capsys: pytest.CaptureFixture[str], coordinator_config: Path) -> None:
    code, out, _ = _midgate(capsys, "coordinator", "job", "list", "--config", str(coordinator_config))
    assert (code, out.strip()) == (0, "no jobs yet (`midgate coordinator job start` runs one)")
    code, out, _ = _midgate(capsys, "coordinator", "devices", "--config", str(coordinator_config))
    assert code == 0 and out.startswith("no devices enrolled yet")


def test_a_bug_keeps_its_traceback_but_not_the_local_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(path: Path) -> None:
        invite_token = SECRET  # a local variable a rich traceback with locals would print
        raise RuntimeError(f"a bug near {len(invite_token)} characters")

    monkeypatch.setattr("coordinator.config.CoordinatorSettings.load", broken)
    with pytest.raises(RuntimeError, match="a bug near"):
        app(["coordinator", "devices"], prog_name="midgate")
    assert app.pretty_exceptions_show_locals is False


def test_task_commands_approve_list_show_and_refuse_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, coordinator_config: Path
) -> None:
    from test_task_specs import VIBRATION

    spec = tmp_path / "vibration.json"
    spec.write_text(json.dumps(VIBRATION))
    code, out, _ = _midgate(capsys, "coordinator", "task", "add", str(spec), "--config", str(coordinator_config))
    assert code == 0 and out.startswith("added: vibration-fault@1  classification  mlp-classifier  accel_x[g]")
    code, out, _ = _midgate(capsys, "coordinator", "task", "list", "--config", str(coordinator_config))
    assert [line.split()[0] for line in out.splitlines()] == [
        "env-forecast@1", "host-anomaly@1", "plaid-appliance@1", "vibration-fault@1"
    ]  # fmt: skip
    code, out, _ = _midgate(
        capsys, "coordinator", "task", "show", "vibration-fault@1", "--config", str(coordinator_config)
    )
    assert code == 0 and json.loads(out)["model"] == {"family": "mlp-classifier", "hidden": 8}
    spec.write_text(json.dumps({**VIBRATION, "description": "changed after publishing"}))
    code, _, err = _midgate(capsys, "coordinator", "task", "add", str(spec), "--config", str(coordinator_config))
    assert code == 2 and _one_line(err).startswith(
        "task refused: policy_violation: a published task spec never changes"
    )
    spec.write_text(json.dumps({**VIBRATION, "model": {"family": "user-code", "hidden": 8}}))
    code, _, err = _midgate(capsys, "coordinator", "task", "add", str(spec), "--config", str(coordinator_config))
    assert code == 2 and _one_line(err).startswith("task refused: malformed: task spec does not match its schema")
    code, _, err = _midgate(
        capsys, "coordinator", "task", "show", "vibration-fault@2", "--config", str(coordinator_config)
    )
    assert code == 1 and _one_line(err).startswith("unknown_task: unknown task")
