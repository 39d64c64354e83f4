"""docs/protocol.md describes the protocol as built: every reason code with its HTTP status, payloadType, message field,
topic kind, HTTP route, metric series, and the worked example's bytes."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from coordinator.dashboard.http import dashboard_router
from coordinator.gate.gate import ContributionMetrics
from coordinator.http_refusals import http_status, refusal
from coordinator.ingest.metrics import IngestMetrics
from coordinator.ingest.pipeline import INGEST_KINDS, InboundMessage, Outcome, Verdict, log_rejection
from coordinator.serve.http import build_http_app
from protocol.envelope import pae
from protocol.errors import InviteUsedError, Reason
from protocol.identity import SignerKey
from protocol.messages import MESSAGE_TYPES, ContributionBody, DpParams, Heartbeat, StatementLine
from protocol.topics import BroadcastKind, DownKind, UpKind

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_every_reason_code_is_documented(reason: Reason) -> None:
    assert f"| `{reason}` |" in DOC


@pytest.mark.parametrize("model", MESSAGE_TYPES, ids=lambda m: m.__name__)
def test_every_message_is_documented_with_its_payload_type_and_fields(model: type) -> None:
    section = DOC.split(f"### {model.__name__} - `{model.PAYLOAD_TYPE}`", 1)
    assert len(section) == 2, f"no section for {model.__name__}"
    body = section[1].split("\n### ", 1)[0]
    for name in model.model_fields:
        assert f"`{name}`" in body, f"{model.__name__}.{name} undocumented"


@pytest.mark.parametrize("model", [ContributionBody, DpParams, StatementLine], ids=lambda m: m.__name__)
def test_nested_models_are_documented(model: type) -> None:
    for name in model.model_fields:
        assert f"`{name}`" in DOC


def test_every_topic_kind_is_documented() -> None:
    for kind in [*UpKind, *DownKind, *BroadcastKind]:
        assert f"`{kind}`" in DOC


def _section(title: str) -> str:
    """The text under the heading `title` (any level), up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", DOC, re.MULTILINE)
    assert match is not None, f"no section {title!r}"
    rest = DOC[match.end() :]
    end = re.search(rf"^#{{1,{len(match.group(1))}}} ", rest, re.MULTILINE)
    return rest if end is None else rest[: end.start()]


def _http_table() -> dict[str, list[str]]:
    """The "HTTP API" endpoint table: `METHOD /path` -> its cells."""
    rows = {}
    for line in _section("HTTP API").splitlines():
        match = re.match(r"\| `(GET|POST) (/[^`?]*)[^`]*` \|(.*)\|$", line)
        if match:
            rows[f"{match.group(1)} {match.group(2)}"] = [cell.strip() for cell in match.group(3).split(" | ")]
    return rows


def test_the_reason_table_gives_every_code_the_http_status_the_coordinator_refuses_with() -> None:
    statuses = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", _section("Reason codes"), re.MULTILINE))
    assert statuses == {str(reason): str(http_status(reason)) for reason in Reason}


def test_each_endpoint_s_refusals_carry_the_status_of_their_reason() -> None:
    rows = _http_table()
    assert len(rows) >= 11
    for endpoint, cells in rows.items():
        refusals = re.sub(r"\([^)]*\)", "", cells[-1])  # notes in parentheses may quote other words in backticks
        if refusals == "none":
            continue
        for part in refusals.split(";"):
            status, codes = re.fullmatch(r"\s*(\d{3}) (.*)", part, re.DOTALL).groups()  # type: ignore[union-attr]
            for code in re.findall(r"`([a-z_]+)`", codes):
                assert str(http_status(Reason(code))) == status, f"{endpoint}: {code}"


def test_every_http_route_of_serve_is_in_the_endpoint_table_and_no_other() -> None:
    # The routers only keep what they are given until a request comes, so placeholders build the app's route table.
    placeholder: Any = object()
    dashboard = dashboard_router(placeholder, placeholder, lambda reason: None)
    app = build_http_app(
        enroller=placeholder,
        ledger=placeholder,
        revenue=placeholder,
        metrics=CollectorRegistry(),
        on_refusal=lambda reason: None,
        witnesses=placeholder,
        statements=placeholder,
        tasks=placeholder,
        dashboard=dashboard,
        market=placeholder,
    )
    served = {f"{method.upper()} {path}" for path, item in app.openapi()["paths"].items() for method in item}
    # The dashboard's pages are left out of the OpenAPI document, not out of the table.
    assert not any(route.startswith(("GET /operator", "POST /operator")) for route in served)
    served |= {
        f"{method} {route.path}"
        for route in dashboard.routes
        if isinstance(route, APIRoute)
        for method in route.methods - {"HEAD"}
    }
    assert served == set(_http_table())


def test_the_metrics_section_names_every_series_serve_exports() -> None:
    registry = CollectorRegistry()
    IngestMetrics(registry)
    ContributionMetrics(registry)
    exported = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    assert set(re.findall(r"`(midgate_[a-z_]+)", _section("Metrics (`GET /metrics`)"))) == exported
    assert f"`{CONTENT_TYPE_LATEST}`" in _http_table()["GET /metrics"][1]


def test_the_worked_example_is_what_the_protocol_code_computes() -> None:
    example = _section("Envelope (DSSE)")
    seed = re.search(r"RFC 8032's test 1,\n`([0-9a-f]{64})`", DOC).group(1)  # type: ignore[union-attr]
    key = SignerKey("d-example", Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed)))
    assert f"the key id `{key.key_id.hex()}`" in DOC
    assert f"the verifier key text `{key.verifier.text()}`" in DOC
    heartbeat = Heartbeat(seq=1, device_time_ms=1767225600000, status="idle")
    payload = heartbeat.canonical_json()
    assert f"payload ({len(payload)} bytes)\n\n    {payload.decode()}\n" in example
    assert f"`{pae(Heartbeat.PAYLOAD_TYPE, payload)[: -len(payload)].decode()}`" in example
    assert f"```json\n{heartbeat.seal(key).decode()}\n```" in example


def test_the_kinds_ingest_takes_are_the_ones_the_device_session_names() -> None:
    session = _section("A device's MQTT session")
    match = re.search(r"Ingest takes the kinds (.*?); (.*?) are refused `bad_topic`", session, re.DOTALL)
    assert match is not None
    taken, refused = match.groups()
    taken_kinds = set(re.findall(r"`([a-z]+)` \(", taken))
    assert taken_kinds == {str(kind) for kind in INGEST_KINDS}
    assert set(re.findall(r"`([a-z]+)`", refused)) == {str(kind) for kind in UpKind} - taken_kinds


_LOG_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _logged_fields(record: logging.LogRecord) -> set[str]:
    return set(record.__dict__) - _LOG_STANDARD


def _rejection_bullet(msg: str) -> str:
    (bullet,) = [b for b in _section("Rejections are counted and logged").split("\n- ") if f'`"{msg}"`' in b]
    return bullet


def test_an_http_refusal_is_counted_and_logged_once_as_the_docs_say(caplog: pytest.LogCaptureFixture) -> None:
    counted: list[Reason] = []
    with caplog.at_level(logging.INFO):
        answer = refusal(InviteUsedError("invite already used", invite_id="0a1b"), counted.append)
    assert answer.status_code == 409 and json.loads(bytes(answer.body)) == {
        "reason": "invite_used",
        "message": "invite already used",
    }
    assert counted == [Reason.INVITE_USED]
    (record,) = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.WARNING, "request refused")
    assert (record.__dict__["reason"], record.__dict__["status"]) == ("invite_used", 409)
    bullet = _rejection_bullet("request refused")
    assert all(f"`{field}`" in bullet for field in _logged_fields(record))


@pytest.mark.parametrize(
    ("outcome", "reason", "logged"),
    [
        (Outcome.REJECTED, Reason.BAD_SIGNATURE, True),
        (Outcome.REJECTED, Reason.EQUIVOCATION, True),
        (Outcome.REJECTED, Reason.REPLAYED, True),  # a heartbeat replay
        (Outcome.REJECTED, Reason.RATE_LIMITED, False),
        (Outcome.DUPLICATE, Reason.REPLAYED, False),  # a resend answered with its receipt
        (Outcome.ACCEPTED, None, False),
        (Outcome.HEARTBEAT, None, False),
    ],
)
def test_an_mqtt_rejection_is_logged_as_the_docs_say(
    outcome: Outcome, reason: Reason | None, logged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    topic = "mid/riverside/dev/d-1/up/report"
    verdict = Verdict(InboundMessage(topic, b"{}"), outcome, reason, error=f"{reason}: why")
    with caplog.at_level(logging.INFO):
        log_rejection(verdict)
    assert len(caplog.records) == logged
    if logged:
        (record,) = caplog.records
        assert (record.levelno, record.getMessage()) == (logging.WARNING, "message rejected")
        assert (record.__dict__["reason"], record.__dict__["topic"]) == (str(reason), topic)
        bullet = _rejection_bullet("message rejected")
        assert all(f"`{field}`" in bullet for field in _logged_fields(record))
