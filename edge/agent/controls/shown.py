"""What the member sees of its knob and consent: one line per membership, the same text for `midgate agent knob get`,
`midgate agent consent show` and the member page (edge/agent/member_page.py), so the page cannot say otherwise."""

from __future__ import annotations

from pathlib import Path

from edge.agent.controls.commands import vote_states
from edge.agent.controls.state import load_member_state
from edge.agent.ledger_client import LedgerClient, ProofUnavailableError
from edge.agent.membership import OUTBOX_FILE
from protocol.errors import ProtocolError


def knob_line(directory: Path, enrolment_url: str) -> str:
    """The knob, and what it means under the MID's policy (asked of the MID at `enrolment_url`; blocking). Raises
    MemberControlError for a member file that cannot be trusted."""
    state = load_member_state(directory)
    knob = 0 if state.knob_milli is None else state.knob_milli
    said = f"{knob / 1000:+.3f}" + (" (default: never set)" if state.knob_milli is None else "")
    try:
        price = LedgerClient(enrolment_url).knob_price(knob)
    except (ProofUnavailableError, ProtocolError) as exc:
        return f"{directory.name}: knob {said}; price unknown (the MID did not answer: {exc})"
    c = price.currency
    return (
        f"{directory.name}: knob {said}: your price {price.price_minor} {c} minor units per job"
        f" (policy v{price.policy_version}: knob -1 -> {price.lowest_minor}, 0 -> {price.base_price_minor},"
        f" +1 -> {price.highest_minor})"
    )


def consent_line(directory: Path) -> str:
    """The consent and where its signed ConsentPolicy is (read-only look into the outbox). Raises
    MemberControlError for a member file that cannot be trusted."""
    state = load_member_state(directory)
    purposes = "every purpose" if state.allowed_purposes is None else ", ".join(state.allowed_purposes) or "none"
    buyers = ", ".join(state.denied_buyers) or "none"
    sent = "default (never changed): nothing sent"
    if state.consent_ms is not None:
        name = f"consent-{state.consent_ms}"
        sent = f"signed policy {vote_states(directory / OUTBOX_FILE, [name])[name]}"
    sensors = "".join(f"; task {t.task_id} may use: {', '.join(t.sensors) or 'no sensor'}" for t in state.task_sensors)
    return f"{directory.name}: purposes allowed: {purposes}; buyers denied: {buyers}{sensors}; {sent}"
