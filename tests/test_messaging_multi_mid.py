"""One agent, two MIDs: a separate key per MID (memberships unlinkable), both served by one `agent run` process."""

from __future__ import annotations

import pytest
from mqtt_fixtures import MessagingStack, ServiceProcess, agent_toml, contribution_body, holds_nonce, wait_until

from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from edge.agent.membership import load_memberships
from edge.federated.spool import write_body

pytest_plugins = ["mqtt_fixtures"]


@pytest.mark.slow
def test_one_agent_in_two_mids(messaging_stack: MessagingStack) -> None:
    river = messaging_stack
    broker = river.start_broker()
    hill = MessagingStack(river.root / "hill", mid="hillside")
    hill.root.mkdir()
    hill.broker = broker
    agent_dir = river.root / "member"
    agent_dir.mkdir()
    config = agent_dir / "agent.toml"
    config.write_text(agent_toml(agent_dir / "data"))
    process = ServiceProcess("agent", ["agent", "run", "--config", str(config)], agent_dir / "agent.log")
    failed = True
    try:
        river.start_coordinator()
        hill.start_coordinator()
        settings = AgentSettings.load(config)
        enrol(settings, f"http://127.0.0.1:{river.http_port}", river.invite("ana"))
        enrol(settings, f"http://127.0.0.1:{hill.http_port}", hill.invite("ana"))
        memberships = load_memberships(settings.data_dir / "mids")
        assert [m.mid for m in memberships] == ["hillside", "riverside"]
        assert memberships[0].key.verifier != memberships[1].key.verifier
        assert memberships[0].device != memberships[1].device
        process.start()
        nonces = {
            m.mid: stack.publish_invitation(m.device) for stack, m in ((river, memberships[1]), (hill, memberships[0]))
        }
        wait_until(
            lambda: all(holds_nonce(settings.data_dir, mid, nonce) for mid, nonce in nonces.items()),
            30,
            "both MIDs' invitations taken",
        )
        for m in memberships:
            for i in range(50):
                write_body(settings.spool_root / m.mid, contribution_body(i, m.device))
        wait_until(
            lambda: len(river.ledger_contributions()) == 50 and len(hill.ledger_contributions()) == 50, 60, "both"
        )
        for stack, m in ((river, memberships[1]), (hill, memberships[0])):
            assert {kid for kid, _, _ in stack.ledger_contributions()} == {m.key.key_id.hex()}
        failed = False
    finally:
        process.stop()
        hill.close(failed)
        if failed:
            print(process.log_text()[-5000:])
