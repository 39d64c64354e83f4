"""SampleCollection, what `agent run` and `agent sensors sample --config` run: every configured sensor into one real
store on a real event loop, its health written where `agent status` reads it, and fast replays loaded exactly once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from pydantic import TypeAdapter

import edge.sensors.collection as collection_module
from edge.sensors.collection import LOAD_KEY, SampleCollection
from edge.sensors.config import SensorConfig
from edge.sensors.sample import Sample
from edge.sensors.store import SampleStore
from edge.sensors.windows import WindowSpec
from protocol.tasks.spec import get_task

pytestmark = pytest.mark.timeout(60)
SENSORS = TypeAdapter(list[SensorConfig])
TS = "@problemName T\n@univariate true\n@classLabel true a b\n@data\n" + "".join(
    f"{','.join(str(i + k) for k in range(5))}:{'ab'[i % 2]}\n" for i in range(6)
)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def states(store: SampleStore) -> dict[str, str]:
    return {h.name: h.state for h in store.health()}


def test_every_sensor_is_collected_and_its_health_is_stored(tmp_path: Path) -> None:
    (tmp_path / "rec.ts").write_text(TS)
    (tmp_path / "meter.csv").write_text("power_w\n1\n2\nnot-a-number\n4\n")
    configs = SENSORS.validate_python(
        [
            {"driver": "simulated", "name": "env", "period_ms": 10, "dropout": 0},
            {"driver": "replay", "name": "meter", "path": str(tmp_path / "meter.csv"), "rate_hz": 200},
            {"driver": "replay", "name": "rec", "path": str(tmp_path / "rec.ts"), "speed": "max"},
            {"driver": "bme280", "name": "bme", "bus_number": 250},
        ]
    )
    store = SampleStore(tmp_path / "d.db")

    async def main() -> None:
        async with SampleCollection(configs, store, health_interval_s=0.05, flush_interval_s=0.05) as c:
            assert c.scheduler is not None
            status = c.scheduler.status
            await until(lambda: status["env"].samples >= 20 and status["meter"].errors["malformed"] >= 2)
            await until(lambda: states(store).get("rec") == "loaded" and store.count() > 30)
            seen = {h.name: h for h in store.health()}
            assert seen["env"].state == "sampling" and seen["env"].last_t_ms is not None
            assert seen["meter"].errors["malformed"] >= 1 and "not a number" in (seen["meter"].last_error or "")
            assert seen["rec"].samples == 30 and seen["rec"].driver == "replay"
            assert seen["bme"].state == "unavailable" and "sensor_unavailable" in (seen["bme"].last_error or "")
            await until(lambda: any(h.name == "env" and h.rate_hz > 0 for h in store.health()))

    asyncio.run(main())
    after = {h.name: h.state for h in store.health()}
    assert after == {"env": "stopped", "meter": "stopped", "rec": "loaded", "bme": "unavailable"}
    assert store.classes("rec") == ("a", "b") and store.classes("env") == ()
    # A live sensor is stored with its source, so a task whose inputs name that source can use its data.
    forecast = get_task("env-forecast", 1)
    inputs = WindowSpec(
        "",
        tuple(i.name for i in forecast.inputs),
        forecast.window_length,
        units=tuple(i.unit for i in forecast.inputs),
        sources=forecast.inputs[0].sources,
    )
    assert store.fitting_sensors(inputs)[0] == ["env"]
    store.close()


def test_a_fast_replay_is_loaded_once_and_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rec.ts").write_text(TS)
    configs = SENSORS.validate_python(
        [{"driver": "replay", "name": "rec", "path": str(tmp_path / "rec.ts"), "speed": "max"}]
    )
    monkeypatch.setattr(collection_module, "LOAD_BATCH", 7)

    class StoppingStore(SampleStore):
        """Stops the collection right after its first batch, as an agent stopped in the middle of a load."""

        collection: SampleCollection | None = None

        def write(self, samples: Sequence[Sample]) -> int:
            written = super().write(samples)
            if self.collection is not None:
                self.collection._stopping.set()
            return written

    async def run(store: SampleStore) -> None:
        collection = SampleCollection(configs, store, health_interval_s=0.05)
        if isinstance(store, StoppingStore):
            store.collection = collection
        async with collection:
            await until(lambda: bool(collection.loads) and collection.loads[0].state != "loading")

    first = StoppingStore(tmp_path / "d.db")
    asyncio.run(run(first))
    mark = json.loads(first.get_meta(LOAD_KEY + "rec") or "{}")
    assert (mark["reads"], mark["samples"], mark["done"]) == (7, 7, False) and first.count() == 7
    assert states(first) == {"rec": "stopped"}
    first.close()

    with SampleStore(tmp_path / "d.db") as store:
        asyncio.run(run(store))
        assert store.count() == 30 and states(store) == {"rec": "loaded"}
        times = [s.t_ms for s in reversed(store.latest("rec", 100))]
        assert times == [mark["start_ms"] + 10 * k for k in range(30)]  # one recording at 100 Hz, no gap, no repeat
        assert times[-1] < time.time() * 1000  # stamped so that it ends when the load began: past data
        asyncio.run(run(store))  # an agent restarted after the load: nothing loaded twice
        assert store.count() == 30 and states(store) == {"rec": "loaded"}
