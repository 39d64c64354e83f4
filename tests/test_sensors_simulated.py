"""The simulated household: deterministic for a seed, different per device, daily cycles, and real-looking faults."""

from __future__ import annotations

import numpy as np
import pytest

from edge.sensors.errors import SensorIOError
from edge.sensors.simulated import DAY_MS, STUCK_STRETCH_MS, SimulatedEnvironmentSensor

T0 = 1_764_115_200_000  # 2025-11-26 00:00 UTC, a Wednesday
MINUTE = 60_000


def readings(sensor: SimulatedEnvironmentSensor, times: list[int]) -> dict[int, tuple[float, ...] | None]:
    out: dict[int, tuple[float, ...] | None] = {}
    for t in times:
        try:
            out[t] = sensor.read(t).values
        except SensorIOError:
            out[t] = None
    return out


def test_same_seed_same_readings_in_any_order() -> None:
    times = [T0 + k * 7_919 for k in range(500)]
    a = readings(SimulatedEnvironmentSensor(device="d1", seed=7), times)
    b = readings(SimulatedEnvironmentSensor(device="d1", seed=7), list(reversed(times)))
    assert a == b
    c = readings(SimulatedEnvironmentSensor(device="d1", seed=8), times)
    assert a != c


def test_devices_differ_so_data_is_not_iid() -> None:
    times = [T0 + k * 10 * MINUTE for k in range(6 * 24 * 7)]
    means = []
    for device in ("home-a", "home-b", "home-c"):
        sensor = SimulatedEnvironmentSensor(device=device, seed=1, dropout=0, spike=0, stuck=0)
        means.append(np.array([sensor.read(t).values for t in times]).mean(axis=0))
    temps = [m[0] for m in means]
    power = [m[4] for m in means]
    assert max(temps) - min(temps) > 0.5
    assert max(power) - min(power) > 20.0


def test_temperature_follows_a_daily_cycle() -> None:
    sensor = SimulatedEnvironmentSensor(device="d", seed=3, dropout=0, spike=0, stuck=0)
    warmest = sensor.household.warmest_hour
    at_peak = [sensor.clean_values(T0 + d * DAY_MS + int(warmest * 3_600_000))[0] for d in range(7)]
    at_trough = [sensor.clean_values(T0 + d * DAY_MS + int(((warmest + 12) % 24) * 3_600_000))[0] for d in range(7)]
    assert np.mean(at_peak) - np.mean(at_trough) > sensor.household.swing_c


def test_dropouts_raise_and_occur_at_roughly_the_configured_rate() -> None:
    sensor = SimulatedEnvironmentSensor(device="d", seed=5, dropout=0.05, spike=0, stuck=0)
    found = readings(sensor, [T0 + k * 1000 for k in range(20_000)])
    rate = sum(v is None for v in found.values()) / len(found)
    assert 0.04 < rate < 0.06


def test_stuck_stretches_repeat_one_value_and_spikes_jump() -> None:
    stuck = SimulatedEnvironmentSensor(device="d", seed=9, dropout=0, spike=0, stuck=0.2)
    stretches = 0
    for s in range(200):
        start = T0 + s * STUCK_STRETCH_MS
        values = {stuck.read(start + k * 30_000).values for k in range(5)}
        stretches += len(values) == 1
    assert 20 < stretches < 60  # ~20 % of 200 stretches are stuck; a live sensor's noise never repeats exactly

    spiky = SimulatedEnvironmentSensor(device="d", seed=9, dropout=0, spike=0.01, stuck=0)
    clean = SimulatedEnvironmentSensor(device="d", seed=9, dropout=0, spike=0, stuck=0)
    times = [T0 + k * 1000 for k in range(5000)]
    jumps = sum(spiky.read(t).values != clean.read(t).values for t in times)
    assert 25 < jumps < 80


@pytest.mark.parametrize("field", ["co2_ppm", "power_w"])
def test_values_stay_physical(field: str) -> None:
    sensor = SimulatedEnvironmentSensor(device="x", seed=2, dropout=0)
    index = [c.name for c in sensor.channels].index(field)
    values = [sensor.read(T0 + k * 5 * MINUTE).values[index] for k in range(2000)]
    assert min(values) >= 0.0
