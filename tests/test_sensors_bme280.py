"""BME280 driver against a fake I2C bus that serves the chip's registers.

Expected values and where they come from:
- Temperature and pressure: the worked example in the Bosch BMP280 datasheet (BST-BMP280-DS001, section 3.12,
  "Calculating pressure and temperature": dig_T1..T3 = 27504, 26435, -1000; dig_P1..P9 = 36477, -10685, 3024,
  2855, 140, -7, 15500, -14600, 6000; adc_T = 519888, adc_P = 415148 give t_fine = 128422, T = 25.08 °C and
  p = 100653.27 Pa). The BME280 datasheet (BST-BME280-DS002, section 4.2.3) uses the identical T and P formulas
  and register layout, so the same calibration must give the same results.
- Humidity: the BME280 datasheet has no worked humidity example, so the expected value is computed in this file with
  the datasheet's double-precision formula (BST-BME280-DS002, section 8.1, `BME280_compensate_H_double`), which is
  independent of the integer formula the driver uses; the two must agree to within the integer formula's
  resolution (1/1024 %RH) plus its rounding (we allow 0.02 %RH). The humidity calibration words
  (dig_H1..H6 = 75, 362, 0, 313, 50, 30) are typical of production parts.
"""

from __future__ import annotations

import struct

import pytest

from edge.sensors.bme280 import Bme280Sensor, Calibration, compensate_pressure, compensate_temperature
from edge.sensors.errors import SensorIOError, SensorUnavailableError

ADDRESS = 0x76
TP_CAL = (27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000)
H_CAL = dict(H1=75, H2=362, H3=0, H4=313, H5=50, H6=30)


def calibration_registers() -> dict[int, int]:
    """Register bytes 0x88..0xA1 and 0xE1..0xE7 encoded as the datasheet's table 16/18 lays them out."""
    regs: dict[int, int] = {}
    tp = struct.pack("<HhhHhhhhhhhh", *TP_CAL) + b"\x00" + bytes([H_CAL["H1"]])  # 0xA0 is unused, 0xA1 = dig_H1
    regs.update({0x88 + i: b for i, b in enumerate(tp)})
    h4, h5 = H_CAL["H4"], H_CAL["H5"]
    h = struct.pack("<h", H_CAL["H2"]) + bytes(
        [H_CAL["H3"], (h4 >> 4) & 0xFF, (h4 & 0x0F) | ((h5 & 0x0F) << 4), (h5 >> 4) & 0xFF, H_CAL["H6"] & 0xFF]
    )
    regs.update({0xE1 + i: b for i, b in enumerate(h)})
    return regs


def raw_registers(adc_p: int, adc_t: int, adc_h: int) -> dict[int, int]:
    burst = [adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4, adc_t >> 12, (adc_t >> 4) & 0xFF]
    burst += [(adc_t & 0x0F) << 4, adc_h >> 8, adc_h & 0xFF]
    return {0xF7 + i: b for i, b in enumerate(burst)}


class FakeBus:
    """Serves a register map like the chip; `fail_after` makes every transfer after that many raise EIO."""

    def __init__(self, registers: dict[int, int], chip_id: int = 0x60) -> None:
        self.registers = {0xD0: chip_id, 0xF3: 0x00, **registers}
        self.writes: list[tuple[int, int]] = []
        self.fail_from: int | None = None
        self.transfers = 0

    def _transfer(self, address: int) -> None:
        self.transfers += 1
        if address != ADDRESS:
            raise OSError(121, "Remote I/O error")  # no ACK at that address, as the kernel reports it
        if self.fail_from is not None and self.transfers >= self.fail_from:
            raise OSError(5, "Input/output error")

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        self._transfer(i2c_addr)
        return self.registers.get(register, 0)

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._transfer(i2c_addr)
        self.writes.append((register, value))

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        self._transfer(i2c_addr)
        return [self.registers.get(register + i, 0) for i in range(length)]


def humidity_double(t_fine: int, adc_h: int) -> float:
    """BST-BME280-DS002 §8.1 BME280_compensate_H_double, transcribed."""
    h = H_CAL
    var_h = t_fine - 76800.0
    var_h = (adc_h - (h["H4"] * 64.0 + h["H5"] / 16384.0 * var_h)) * (
        h["H2"] / 65536.0 * (1.0 + h["H6"] / 67108864.0 * var_h * (1.0 + h["H3"] / 67108864.0 * var_h))
    )
    var_h = var_h * (1.0 - h["H1"] * var_h / 524288.0)
    return min(max(var_h, 0.0), 100.0)


def test_calibration_words_decode_from_the_register_layout() -> None:
    bus = FakeBus(calibration_registers())
    cal = Bme280Sensor(bus=bus, address=ADDRESS).calibration
    assert (cal.T1, cal.T2, cal.T3, cal.P1, cal.P2, cal.P9) == (27504, 26435, -1000, 36477, -10685, 6000)
    assert (cal.H1, cal.H2, cal.H3, cal.H4, cal.H5, cal.H6) == (75, 362, 0, 313, 50, 30)


def test_negative_12_bit_humidity_words_keep_their_sign() -> None:
    regs = calibration_registers()
    regs[0xE4], regs[0xE5], regs[0xE6] = 0xFE, 0x3C, 0xFF  # H4 = 0xFEC (-20), H5 = 0xFF3 (-13) as 12-bit
    cal = Bme280Sensor(bus=FakeBus(regs), address=ADDRESS).calibration
    assert (cal.H4, cal.H5) == (0xFEC - 0x1000, 0xFF3 - 0x1000)


def test_datasheet_example_temperature_and_pressure() -> None:
    cal = Calibration(*TP_CAL, **H_CAL)
    temp, t_fine = compensate_temperature(cal, 519888)
    assert t_fine == 128422  # datasheet: t_fine = 128422
    assert temp == 2508  # datasheet: T = 25.08 °C
    pressure_pa = compensate_pressure(cal, 415148, t_fine) / 256.0
    assert pressure_pa == pytest.approx(100653.27, abs=0.05)  # datasheet: p = 100653.27 Pa


def test_a_forced_measurement_through_the_bus() -> None:
    adc_h = 30000
    bus = FakeBus({**calibration_registers(), **raw_registers(415148, 519888, adc_h)})
    sensor = Bme280Sensor(bus=bus, address=ADDRESS)
    sample = sensor.read(1_764_000_000_000)
    temp_c, pressure_hpa, humidity = sample.values
    assert temp_c == pytest.approx(25.08)
    assert pressure_hpa == pytest.approx(1006.5327, abs=0.0005)
    assert humidity == pytest.approx(humidity_double(128422, adc_h), abs=0.02)
    # ctrl_hum (0xF2) must be written before ctrl_meas (0xF4), and ctrl_meas asks for forced mode (bits 1:0 = 01).
    registers = [r for r, _ in bus.writes]
    assert registers.index(0xF2) < registers.index(0xF4)
    assert dict(bus.writes)[0xF4] & 0b11 == 0b01


@pytest.mark.parametrize("adc_h", [26000, 28000, 33000, 38000])
def test_integer_humidity_agrees_with_the_double_formula(adc_h: int) -> None:
    bus = FakeBus({**calibration_registers(), **raw_registers(415148, 519888, adc_h)})
    humidity = Bme280Sensor(bus=bus, address=ADDRESS).measure()[2]
    assert humidity == pytest.approx(humidity_double(128422, adc_h), abs=0.02)


def test_no_device_at_the_address_is_a_clear_unavailable_error() -> None:
    with pytest.raises(SensorUnavailableError) as err:
        Bme280Sensor(bus=FakeBus(calibration_registers()), address=0x77)
    assert err.value.reason == "sensor_unavailable" and err.value.details["address"] == "0x77"


def test_a_different_chip_is_refused() -> None:
    with pytest.raises(SensorUnavailableError, match="not a BME280"):
        Bme280Sensor(bus=FakeBus(calibration_registers(), chip_id=0x58), address=ADDRESS)  # 0x58 = BMP280


def test_i2c_error_during_a_read_then_recovery() -> None:
    bus = FakeBus({**calibration_registers(), **raw_registers(415148, 519888, 30000)})
    sensor = Bme280Sensor(bus=bus, address=ADDRESS)
    bus.fail_from = bus.transfers + 1
    with pytest.raises(SensorIOError) as err:
        sensor.read(0)
    assert err.value.reason == "sensor_io" and "Input/output error" in err.value.details["error"]
    bus.fail_from = None
    assert sensor.read(1).values[0] == pytest.approx(25.08)


def test_a_skipped_measurement_is_an_error_not_a_value() -> None:
    bus = FakeBus({**calibration_registers(), **raw_registers(415148, 0x80000, 30000)})
    with pytest.raises(SensorIOError, match="skipped"):
        Bme280Sensor(bus=bus, address=ADDRESS).read(0)
