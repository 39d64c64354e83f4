"""Bosch BME280 (temperature, pressure, humidity) over I2C with smbus2.

Registers and formulas from the Bosch BME280 datasheet (BST-BME280-DS002): calibration words at 0x88..0xA1 and
0xE1..0xE7 (§5.4, table 18), raw data burst 0xF7..0xFE (§4, §5.4.7-5.4.9), and the integer compensation
`BME280_compensate_T_int32`, `BME280_compensate_P_int64` and `bme280_compensate_H_int32` (§4.2.3), ported with C
semantics: `>>` on negative numbers is arithmetic (as Python's) and `/` truncates toward zero (unlike Python's //).

The sensor is read in forced mode: one measurement per `read()`, after which it sleeps (the datasheet's
recommendation for low-rate weather monitoring, §3.5.1), so its self-heating does not bias the temperature.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from edge.sensors.errors import SensorIOError, SensorUnavailableError
from edge.sensors.sample import ChannelSpec, Sample

CHIP_ID = 0x60
REG_CALIB_TP = 0x88  # 26 bytes 0x88..0xA1; dig_H1 is the last
REG_CALIB_H = 0xE1  # 7 bytes 0xE1..0xE7
REG_ID = 0xD0
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7  # 8 bytes: press msb/lsb/xlsb, temp msb/lsb/xlsb, hum msb/lsb
STATUS_MEASURING = 0x08
OVERSAMPLING_X1 = 0b001
MODE_FORCED = 0b01
SKIPPED_20BIT = 0x80000  # value of a skipped temperature/pressure measurement
SKIPPED_16BIT = 0x8000


class I2cBus(Protocol):
    """The part of smbus2.SMBus the driver uses."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class Calibration:
    T1: int
    T2: int
    T3: int
    P1: int
    P2: int
    P3: int
    P4: int
    P5: int
    P6: int
    P7: int
    P8: int
    P9: int
    H1: int
    H2: int
    H3: int
    H4: int
    H5: int
    H6: int

    @staticmethod
    def from_registers(tp: list[int], h: list[int]) -> Calibration:
        """Decode calibration bytes 0x88..0xA1 (26) and 0xE1..0xE7 (7). Requires those exact lengths."""
        if len(tp) != 26 or len(h) != 7:
            raise SensorIOError("short calibration read", expected=(26, 7), found=(len(tp), len(h)))

        def u16(b: list[int], i: int) -> int:
            return b[i] | (b[i + 1] << 8)

        def s16(b: list[int], i: int) -> int:
            v = u16(b, i)
            return v - 0x10000 if v & 0x8000 else v

        def s8(v: int) -> int:
            return v - 0x100 if v & 0x80 else v

        return Calibration(
            T1=u16(tp, 0),
            T2=s16(tp, 2),
            T3=s16(tp, 4),
            P1=u16(tp, 6),
            **{f"P{k}": s16(tp, 6 + 2 * (k - 1)) for k in range(2, 10)},
            H1=tp[25],
            H2=s16(h, 0),
            H3=h[2],
            # dig_H4 = 0xE4[7:0] -> [11:4], 0xE5[3:0] -> [3:0]; dig_H5 = 0xE6[7:0] -> [11:4], 0xE5[7:4] -> [3:0];
            # both signed 12-bit, as the Bosch reference driver decodes them (int8 of the high byte times 16).
            H4=s8(h[3]) * 16 | (h[4] & 0x0F),
            H5=s8(h[5]) * 16 | (h[4] >> 4),
            H6=s8(h[6]),
        )


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def compensate_temperature(cal: Calibration, adc_t: int) -> tuple[int, int]:
    """BME280_compensate_T_int32: (temperature in 0.01 °C, t_fine)."""
    var1 = (((adc_t >> 3) - (cal.T1 << 1)) * cal.T2) >> 11
    var2 = (((((adc_t >> 4) - cal.T1) * ((adc_t >> 4) - cal.T1)) >> 12) * cal.T3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_pressure(cal: Calibration, adc_p: int, t_fine: int) -> int:
    """BME280_compensate_P_int64: pressure in Pa as Q24.8 (value / 256 = Pa); 0 when the divisor is 0."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * cal.P6
    var2 = var2 + ((var1 * cal.P5) << 17)
    var2 = var2 + (cal.P4 << 35)
    var1 = ((var1 * var1 * cal.P3) >> 8) + ((var1 * cal.P2) << 12)
    var1 = (((1 << 47) + var1) * cal.P1) >> 33
    if var1 == 0:
        return 0
    p = 1048576 - adc_p
    p = _cdiv(((p << 31) - var2) * 3125, var1)
    var1 = (cal.P9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (cal.P8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (cal.P7 << 4)


def compensate_humidity(cal: Calibration, adc_h: int, t_fine: int) -> int:
    """bme280_compensate_H_int32: relative humidity in %RH as Q22.10 (value / 1024 = %RH)."""
    x = t_fine - 76800
    scaled = (((adc_h << 14) - (cal.H4 << 20) - (cal.H5 * x)) + 16384) >> 15
    gain = ((((((x * cal.H6) >> 10) * (((x * cal.H3) >> 11) + 32768)) >> 10) + 2097152) * cal.H2 + 8192) >> 14
    v = scaled * gain
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * cal.H1) >> 4)
    v = min(max(v, 0), 419430400)
    return v >> 12


def decode_raw(data: list[int]) -> tuple[int, int, int]:
    """(adc_P, adc_T, adc_H) from the 8-byte burst at 0xF7."""
    adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
    adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
    adc_h = (data[6] << 8) | data[7]
    return adc_p, adc_t, adc_h


class Bme280Sensor:
    """A BME280 at `address` (0x76 or 0x77) on `bus` (an smbus2.SMBus, or any object with its three methods).

    Channels: temperature_c, pressure_hpa, humidity_pct. Raises SensorUnavailableError when no BME280 answers at
    the address (wrong chip id or I2C error at start), SensorIOError when a later read fails or returns a skipped
    measurement. `bus_number` opens /dev/i2c-N with smbus2 when no bus is given.
    """

    blocking = True
    class_names: tuple[str, ...] = ()  # unlabelled
    source: str = "bme280"
    channels: tuple[ChannelSpec, ...] = (
        ChannelSpec("temperature_c", "°C"),
        ChannelSpec("pressure_hpa", "hPa"),
        ChannelSpec("humidity_pct", "%RH"),
    )

    def __init__(
        self,
        name: str = "bme280",
        *,
        bus: I2cBus | None = None,
        bus_number: int = 1,
        address: int = 0x76,
        period_ms: float = 1000.0,
        measure_timeout_s: float = 0.1,
    ) -> None:
        self.name = name
        self.address = address
        self.period_ms = period_ms
        self.measure_timeout_s = measure_timeout_s
        self._owned_bus = bus is None
        if bus is None:
            try:
                from smbus2 import SMBus

                bus = SMBus(bus_number)
            except OSError as exc:
                raise SensorUnavailableError("cannot open I2C bus", bus=bus_number, error=str(exc)) from exc
        self.bus: I2cBus = bus
        try:
            chip = bus.read_byte_data(address, REG_ID)
        except OSError as exc:
            raise SensorUnavailableError("no I2C device answers", address=hex(address), error=str(exc)) from exc
        if chip != CHIP_ID:
            raise SensorUnavailableError("device is not a BME280", address=hex(address), chip_id=hex(chip))
        self.calibration = self._read_calibration()

    def _read_calibration(self) -> Calibration:
        try:
            tp = self.bus.read_i2c_block_data(self.address, REG_CALIB_TP, 26)
            h = self.bus.read_i2c_block_data(self.address, REG_CALIB_H, 7)
        except OSError as exc:
            raise SensorUnavailableError("calibration read failed", address=hex(self.address), error=str(exc)) from exc
        return Calibration.from_registers(list(tp), list(h))

    def measure(self) -> tuple[float, float, float]:
        """One forced-mode measurement: (°C, hPa, %RH)."""
        try:
            # ctrl_hum takes effect only after a write to ctrl_meas (datasheet §5.4.3), so it goes first.
            self.bus.write_byte_data(self.address, REG_CTRL_HUM, OVERSAMPLING_X1)
            self.bus.write_byte_data(
                self.address, REG_CTRL_MEAS, (OVERSAMPLING_X1 << 5) | (OVERSAMPLING_X1 << 2) | MODE_FORCED
            )
            deadline = time.monotonic() + self.measure_timeout_s
            while self.bus.read_byte_data(self.address, REG_STATUS) & STATUS_MEASURING:
                if time.monotonic() > deadline:
                    raise SensorIOError("measurement did not finish", address=hex(self.address))
                time.sleep(0.002)
            data = list(self.bus.read_i2c_block_data(self.address, REG_DATA, 8))
        except OSError as exc:
            raise SensorIOError("I2C transfer failed", address=hex(self.address), error=str(exc)) from exc
        if len(data) != 8:
            raise SensorIOError("short data read", expected=8, found=len(data))
        adc_p, adc_t, adc_h = decode_raw(data)
        if adc_t == SKIPPED_20BIT or adc_p == SKIPPED_20BIT or adc_h == SKIPPED_16BIT:
            raise SensorIOError("sensor returned a skipped measurement", adc_t=adc_t, adc_p=adc_p, adc_h=adc_h)
        temp, t_fine = compensate_temperature(self.calibration, adc_t)
        pressure = compensate_pressure(self.calibration, adc_p, t_fine)
        humidity = compensate_humidity(self.calibration, adc_h, t_fine)
        return temp / 100.0, pressure / 256.0 / 100.0, humidity / 1024.0

    def read(self, t_ms: int) -> Sample:
        return Sample(self.name, t_ms, self.measure())

    def close(self) -> None:
        close = getattr(self.bus, "close", None)
        if self._owned_bus and callable(close):
            close()
