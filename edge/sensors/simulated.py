"""Simulated household environment: temperature, humidity, pressure, CO2 and power draw.

Every value is a pure function of (seed, device, t_ms): the same seed and timestamps give the same readings in any
order and on any machine, so tests and demos are reproducible however the scheduler's ticks fall. Devices differ
(non-IID): each draws its own climate, occupancy hours, number of occupants and appliance load from its seed.

Faults, as real cheap sensors show them: dropouts (the read fails: SensorIOError), spikes (one channel jumps for
one reading) and stuck values (the sensor repeats the reading at the start of a 10-minute stretch). Spikes and stuck
values are not flagged: a real sensor does not say it is lying; downstream screening has to notice.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from edge.sensors.errors import SensorIOError
from edge.sensors.sample import ChannelSpec, Sample

DAY_MS = 86_400_000
STUCK_STRETCH_MS = 600_000
_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64 finaliser: a fast, well-distributed hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@dataclass(frozen=True, slots=True)
class Household:
    """Per-device parameters (drawn from the seed)."""

    indoor_c: float  # mean indoor temperature
    swing_c: float  # daily temperature amplitude
    warmest_hour: float
    humidity_pct: float
    pressure_hpa: float
    occupants: int
    wake_hour: float
    home_hour: float
    base_load_w: float
    heater_w: float


class SimulatedEnvironmentSensor:
    """A simulated multi-sensor in one household.

    Parameters
    ----------
    name: sensor name in the store; default "env".
    device: device id; different devices get different households.
    seed: the data set seed; default 0.
    period_ms: sampling period; default 1000.
    dropout, spike, stuck: per-reading probability of a failed read and of a spike, and per-10-minute-stretch
        probability of a stuck sensor; defaults 0.01, 0.002, 0.01. Zero disables a fault.
    """

    blocking = False
    class_names: tuple[str, ...] = ()  # unlabelled
    source: str = "simulated"
    channels: tuple[ChannelSpec, ...] = (
        ChannelSpec("temperature_c", "°C"),
        ChannelSpec("humidity_pct", "%RH"),
        ChannelSpec("pressure_hpa", "hPa"),
        ChannelSpec("co2_ppm", "ppm"),
        ChannelSpec("power_w", "W"),
    )

    def __init__(
        self,
        name: str = "env",
        *,
        device: str = "device-0",
        seed: int = 0,
        period_ms: float = 1000.0,
        dropout: float = 0.01,
        spike: float = 0.002,
        stuck: float = 0.01,
    ) -> None:
        self.name = name
        self.device = device
        self.period_ms = period_ms
        self.dropout, self.spike, self.stuck = dropout, spike, stuck
        self._key = int.from_bytes(hashlib.sha256(f"{seed}/{device}".encode()).digest()[:8], "big")
        self.household = self._draw_household()

    def _u(self, *parts: int) -> float:
        """Uniform [0, 1) from the device key and `parts`."""
        h = self._key
        for p in parts:
            h = _mix(h ^ (p & _MASK))
        return (h >> 11) / float(1 << 53)

    def _normal(self, *parts: int) -> float:
        u1 = max(self._u(*parts, 1), 1e-300)
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * self._u(*parts, 2))

    def _draw_household(self) -> Household:
        def between(k: int, lo: float, hi: float) -> float:
            return lo + (hi - lo) * self._u(0xC0FFEE, k)

        return Household(
            indoor_c=between(1, 17.5, 23.5),
            swing_c=between(2, 0.8, 4.0),
            warmest_hour=between(3, 13.0, 18.0),
            humidity_pct=between(4, 32.0, 62.0),
            pressure_hpa=between(5, 995.0, 1030.0),
            occupants=1 + int(between(6, 0, 5)),
            wake_hour=between(7, 5.5, 8.5),
            home_hour=between(8, 16.0, 19.5),
            base_load_w=between(9, 40.0, 220.0),
            heater_w=between(10, 0.0, 1500.0),
        )

    def clean_values(self, t_ms: int) -> tuple[float, ...]:
        """The readings without faults: daily cycles plus sensor noise."""
        h = self.household
        hour = (t_ms % DAY_MS) / 3_600_000.0
        day = t_ms // DAY_MS
        weekend = day % 7 in (2, 3)  # 1970-01-01 was a Thursday, so days 2 and 3 mod 7 are Saturday and Sunday
        home = weekend or hour < h.wake_hour + 1.0 or hour >= h.home_hour
        awake = h.wake_hour <= hour < 23.0
        people = h.occupants if home and awake else (h.occupants if home else 0) * 0.3
        daily = math.cos(2.0 * math.pi * (hour - h.warmest_hour) / 24.0)
        temp = h.indoor_c + h.swing_c * daily + 0.4 * people + 0.05 * self._normal(t_ms, 11)
        humidity = h.humidity_pct - 2.5 * h.swing_c * daily + 1.5 * people + 0.4 * self._normal(t_ms, 12)
        # Weather fronts: a slow multi-day swing, the same in all households with the same pressure baseline.
        pressure = h.pressure_hpa + 6.0 * math.sin(2.0 * math.pi * t_ms / (3.3 * DAY_MS)) + 0.1 * self._normal(t_ms, 13)
        co2 = 420.0 + 180.0 * people + 15.0 * self._normal(t_ms, 14)
        heating = h.heater_w if home and awake and temp < h.indoor_c else 0.0
        cooking = 1800.0 if home and (abs(hour - (h.home_hour + 1.0)) < 0.4) else 0.0
        power = h.base_load_w + 60.0 * people + heating + cooking + 8.0 * self._normal(t_ms, 15)
        return (temp, humidity, pressure, max(co2, 350.0), max(power, 0.0))

    def read(self, t_ms: int) -> Sample:
        if self.dropout and self._u(t_ms, 21) < self.dropout:
            raise SensorIOError("simulated dropout", sensor=self.name, t_ms=t_ms)
        stretch = t_ms // STUCK_STRETCH_MS
        if self.stuck and self._u(stretch, 22) < self.stuck:
            values = list(self.clean_values(stretch * STUCK_STRETCH_MS))
        else:
            values = list(self.clean_values(t_ms))
        if self.spike and self._u(t_ms, 23) < self.spike:
            channel = int(self._u(t_ms, 24) * len(values))
            values[channel] *= 1.0 + 4.0 * self._u(t_ms, 25)
        return Sample(self.name, t_ms, tuple(values))

    def close(self) -> None:
        pass
