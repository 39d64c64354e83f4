"""Issue 21: a device configured as a Raspberry Pi hub completes a job under the systemd unit's `MemoryMax`.

Real processes (tests/fl_stack.py, as the job tests run them): Mosquitto, `midgate coordinator serve` with its
SuperLink, two enrolled `midgate agent run`s with the Pi's `keep_warm_executor = false`, and a 2-round job run by
`midgate coordinator job start`. Device m0's agent runs in a cgroup v1 memory group (tests/memory_cgroup.py) limited to
the `MemoryMax=` read from deploy/raspberrypi/midgate-agent.service, swap forbidden, from its start; everything it
starts for the job (its SuperNode, with the SuperExec and ClientApps as threads) inherits the group. The job must
complete and nothing in the group be OOM-killed. The smallest limit that still completes is
bench/device_memory_bench.py --bisect's, not this test's."""

from __future__ import annotations

import contextlib
import os

import pytest
from fl_stack import finished_job, start_federated_coordinator, start_job, start_plaid_agents, stopping_federation
from memory_cgroup import memory_group, unit_memory_bytes, unwritable_reason
from mqtt_fixtures import AgentHandle, MessagingStack, wait_until

pytest_plugins = ["mqtt_fixtures"]

ROUNDS = 2
PI_SETTINGS = "keep_warm_executor = false"  # deploy/raspberrypi/agent.toml.template


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_pi_configured_device_completes_a_job_under_the_units_memory_max(messaging_stack: MessagingStack) -> None:
    reason = unwritable_reason()
    if reason is not None:
        pytest.skip(f"cannot bound the agent's memory here: {reason}")
    limit = unit_memory_bytes("MemoryMax")
    stack = messaging_stack
    start_federated_coordinator(stack)

    with memory_group(f"midgate-test-{os.getpid()}", limit) as group:

        def start(handle: AgentHandle) -> None:
            """Device m0's agent starts inside the group, as systemd starts it inside its unit's."""
            with group.joined() if handle.name == "m0" else contextlib.nullcontext():
                stack.start_agent(handle)

        agents = start_plaid_agents(stack, 2, extra=PI_SETTINGS, start=start)
        with stopping_federation(stack, agents) as teardown:
            job = start_job(stack, teardown, "job-bounded", ROUNDS)
            # The job's SuperNode (one process: its SuperExec and ClientApps are threads) joins the agent's group, or
            # the group bounds nothing.
            wait_until(lambda: len(group.pids()) > 1, 180, "the job's SuperNode in the agent's memory group")
            assert job.proc is not None
            job.proc.wait(timeout=360)
            peak, hits, kills = group.max_usage_bytes, group.failcnt, group.oom_kills
            print(f"device m0 under MemoryMax {limit >> 20} MB: peak {peak >> 20} MB, limit hits {hits}, kills {kills}")
            # The kills first: a job whose ClientApp the OOM killer ended also fails, for a less telling reason.
            assert kills == 0, f"the OOM killer ended {kills} process(es) of the device under {limit >> 20} MB"
            book = finished_job(stack, job, "job-bounded")

    assert book.flower_status == "finished:completed"
    assert 0 < peak <= limit
