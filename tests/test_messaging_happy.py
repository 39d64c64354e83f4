"""Happy path against real processes: 3 agents enrol, 1,000 reports reach the ledger exactly once, all receipted."""

from __future__ import annotations

import pytest
from mqtt_fixtures import MessagingStack, wait_until, write_bodies

pytest_plugins = ["mqtt_fixtures"]

REPORTS = 1000


@pytest.mark.slow
def test_three_agents_thousand_reports_exactly_once(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    stack.start_broker()
    stack.start_coordinator()
    agents = [stack.enrol_agent(name) for name in ("ana", "ben", "cai")]
    assert len({a.device for a in agents}) == 3
    for agent in agents:
        stack.start_invited_agent(agent)
    written = write_bodies(agents, REPORTS)

    def all_receipted() -> bool:
        return all(a.spool_left() == 0 and a.outbox_counts() == (0, len(written[a.device])) for a in agents)

    wait_until(all_receipted, 120, "every report receipted by its agent")

    leaves = stack.ledger_contributions()
    assert len(leaves) == REPORTS
    assert len({(kid, seq) for kid, seq, _ in leaves}) == REPORTS
    import json

    from protocol.envelope import peek_envelope

    logged = {json.loads(peek_envelope(env)[1])["update_sha256"] for _, _, env in leaves}
    assert logged == set().union(*written.values())
    # Enrol leaves: one per agent, before any contribution; and the POLICY leaf serve logs when it starts.
    assert stack.ledger_size() == REPORTS + 3 + 1
    assert stack.metric("midgate_ingest_accepted_total") == REPORTS


@pytest.mark.slow
def test_agent_on_mqtt_311_is_served_the_same(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    stack.start_broker()
    stack.start_coordinator()
    agent = stack.enrol_agent("old", agent_extra='mqtt_protocol = "3.1.1"')
    stack.start_invited_agent(agent)
    write_bodies([agent], 100)
    wait_until(lambda: agent.spool_left() == 0 and agent.outbox_counts() == (0, 100), 60, "100 receipts over 3.1.1")
    assert len(stack.ledger_contributions()) == 100
    assert stack.broker is not None and "(p2, c0" in stack.broker.log_text()  # protocol 3.1.1, persistent session
