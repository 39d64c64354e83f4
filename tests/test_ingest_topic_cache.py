"""The Screener's parsed-topic cache: same answers as parse_topic, refusals never kept, size bounded."""

from __future__ import annotations

import pytest

import coordinator.ingest.pipeline as pipeline
from coordinator.ingest.pipeline import Screener
from protocol.errors import BadTopicError
from protocol.topics import parse_topic


def test_cached_topics_are_parse_topics_answers_and_the_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "TOPIC_CACHE_SIZE", 2)
    screener = Screener("m", None, 65536, 1.0, 1)  # type: ignore[arg-type]  # the registry is not read here
    names = [f"mid/m/dev/d{i}/up/report" for i in range(5)] * 2
    for name in names:
        assert screener._parse_topic(name) == parse_topic(name)
        assert len(screener._topics) <= 2
    for bad in ["mid/m/dev/d1/up/nonsense", "mid/M/dev/d1/up/report", "x" * 300]:
        for _ in range(2):
            with pytest.raises(BadTopicError):
                screener._parse_topic(bad)
        assert bad not in screener._topics
