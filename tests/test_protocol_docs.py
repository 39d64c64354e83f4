"""docs/protocol.md describes the protocol as built: every reason code, payloadType, message field and topic kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.errors import Reason
from protocol.messages import MESSAGE_TYPES, ContributionBody, DpParams, StatementLine
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
