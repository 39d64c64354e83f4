"""A paused, striking or departed member is not waited for, on real processes: Mosquitto, `coordinator serve` with its
SuperLink, five enrolled `agent run`s replaying PLAID. One member pauses, one strikes against the job's buyer, one
leaves (each with the member commands, as CLI subprocesses: the agents tell the MID in signed messages) and one
device's agent is stopped; `coordinator devices` shows each state. `job start`, with a join timeout far longer than
the job, says whom it waits for and whom not and why, submits the run at once (the job book's timestamps, against the
join timeout: no wall-clock assert) and completes with the one member who came; that member's `agent status` shows
its connection and the job it joined."""

from __future__ import annotations

import subprocess

import pytest
from fl_stack import PlaidAgent, finished_job, midgate, start_job, start_plaid_agents, stop_agent, stopping_federation
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, free_port, wait_until

pytest_plugins = ["mqtt_fixtures"]

JOB = "job-presence"
JOIN_TIMEOUT_S = 400


def _member(handle: AgentHandle, *args: str) -> str:
    """A member command on the device, as the member types it."""
    argv = [PYTHON, "-c", "from midgate_cli import app; app()", "agent", *args, "--config", str(handle.config)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout


def _devices(stack: MessagingStack) -> dict[str, dict[str, str]]:
    """`coordinator devices` as a table: device id -> column -> value."""
    header, *rows = midgate("coordinator", "devices", "--config", str(stack.config)).splitlines()
    columns = header.split("\t")
    return {row.split("\t")[0]: dict(zip(columns, row.split("\t"), strict=True)) for row in rows}


def _start_coordinator(stack: MessagingStack) -> None:
    """`serve` with its SuperLink, a device counted offline 10 s after its last heartbeat (agents beat every 5 s)."""
    stack.start_broker()
    stack.coordinator_extra = f"heartbeat_offline_s = 10\n[federation]\nenabled = true\nport = {free_port()}"
    stack.start_coordinator()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_paused_striking_or_departed_member_is_not_waited_for(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    _start_coordinator(stack)
    agents: list[PlaidAgent] = start_plaid_agents(stack, 5)
    (came, _), (paused, _), (striking, _), (left, _), (stopped, _) = agents
    device = {handle.name: record.device for handle, record in agents}

    with stopping_federation(stack, agents) as teardown:
        _member(paused, "pause")
        _member(striking, "strike", "--buyer", "acme")
        _member(left, "leave", "--yes")
        stop_agent(stopped, teardown.below)

        def told() -> bool:
            shown = _devices(stack)
            return (
                shown[device["m1"]]["paused"].startswith("since ")
                and shown[device["m2"]]["striking"] == "buyer acme"
                and shown[device["m3"]]["left"].startswith("since ")
                and shown[device["m4"]]["online"] == "no"
            )

        wait_until(told, 90, "the MID to know who paused, struck, left and went offline", poll_s=1.0)
        shown = _devices(stack)
        assert (shown[device["m0"]]["online"], shown[device["m0"]]["status"]) == ("yes", "idle")
        assert shown[device["m3"]]["status"] == "left" and shown[device["m2"]]["status"] == "striking"

        job = start_job(
            stack, teardown, JOB, 1, "--min-nodes", "1", "--join-timeout", str(JOIN_TIMEOUT_S), "--device",
            device["m0"], "--device", device["m1"], "--device", device["m2"], "--device", device["m3"],
            "--device", device["m4"],
        )  # fmt: skip
        book = finished_job(stack, job, JOB, timeout_s=JOIN_TIMEOUT_S)
        said = job.log_text()

        assert book.not_waited_for == {
            device["m1"]: "paused",
            device["m2"]: "striking against buyer acme",
            device["m3"]: "left",
            device["m4"]: "offline: no heartbeat lately",
        }
        absent = ", ".join(f"{d} ({why})" for d, why in book.not_waited_for.items())
        assert f"not waiting for 4 device(s): {absent}" in said
        assert (
            f"invited 1 device(s); the first round waits up to {JOIN_TIMEOUT_S} s for them to join: {device['m0']}"
            in said
        )
        assert [d.device_id for d in book.invited] == [device["m0"]]
        # The run went in at once and the whole job ended long before the join timeout would have passed once.
        assert book.submitted_ms is not None and book.ended_ms is not None
        assert book.submitted_ms - book.started_ms < JOIN_TIMEOUT_S * 1000
        assert book.ended_ms - book.started_ms < JOIN_TIMEOUT_S * 1000
        assert "round 1/1: " in said and " 1 node(s), accuracy " in said
        assert "not joined within" not in said

        status = " ".join(_member(came, "status").split())  # cells may fold: compare word by word
        assert f"connected to localhost:{stack.broker.port}" in status, status  # type: ignore[union-attr]
        assert f"1 (latest {JOB})" in status, status
        for handle in (paused, striking, left):
            assert not (handle.data_dir / "mids" / handle.mid / "jobs" / JOB).exists()  # never invited


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_device_is_heard_as_soon_as_its_agent_connects(messaging_stack: MessagingStack) -> None:
    """The agent's first heartbeat goes out when its session connects, not one heartbeat period after it started (by
    then a job started in the meantime has passed the device by as "never heard from"). The agent keeps its default
    period, 60 s; the MID must list it online well before that."""
    from edge.agent.config import AgentSettings

    stack = messaging_stack
    _start_coordinator(stack)
    handle = stack.enrol_agent("m0", heartbeat_s=None)
    assert AgentSettings.load(handle.config).heartbeat_s >= 60
    stack.start_agent(handle)

    def heard() -> bool:
        shown = _devices(stack).get(handle.device)
        return shown is not None and shown["online"] == "yes"

    wait_until(heard, 30, "the MID to hear the new device", poll_s=1.0)
