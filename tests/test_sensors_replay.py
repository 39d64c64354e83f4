"""Replay of recorded data: CSV and UCR/UEA .ts, including damaged files (a bad line is an error for that tick only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.sensors.errors import MalformedError, ReplayEndedError, SensorUnavailableError
from edge.sensors.plaid import plaid_dir
from edge.sensors.replay import CsvReplaySensor, TsReplaySensor
from edge.sensors.sample import Quality
from edge.sensors.tsfile import read_ts

TS_HEADER = "# tiny\n@problemName Tiny\n@timeStamps false\n@univariate true\n@classLabel true a b\n@data\n"


def test_csv_plays_rows_at_the_recorded_rate(tmp_path: Path) -> None:
    path = tmp_path / "power.csv"
    path.write_text("t_ms,power_w[W],label\n0,10.5,1\n250,11.0,1\n500,12.5,0\n750,13.0,0\n")
    sensor = CsvReplaySensor("meter", path, speed=2.0, loop=False)
    assert sensor.period_ms == pytest.approx(125.0)  # 4 Hz recorded, played twice as fast
    assert [(c.name, c.unit) for c in sensor.channels] == [("power_w", "W")]
    got = [sensor.read(t) for t in range(4)]
    assert [s.values for s in got] == [(10.5,), (11.0,), (12.5,), (13.0,)]
    assert [s.label for s in got] == [1, 1, 0, 0]
    assert all(s.quality == Quality.REPLAYED for s in got)
    with pytest.raises(SensorUnavailableError):
        sensor.read(5)


def test_a_malformed_csv_line_fails_that_read_only(tmp_path: Path) -> None:
    path = tmp_path / "env.csv"
    path.write_text("temperature_c,humidity_pct\n20.0,40\n20.5\n21.0,forty-one\n21.5,42\n")
    sensor = CsvReplaySensor("env", path, rate_hz=1.0, loop=False)
    assert sensor.read(0).values == (20.0, 40.0)
    with pytest.raises(MalformedError) as short:
        sensor.read(1)
    assert short.value.details["line"] == 3 and short.value.details["found"] == 1
    with pytest.raises(MalformedError) as text:
        sensor.read(2)
    assert text.value.details["line"] == 4 and text.value.reason == "malformed"
    assert sensor.read(3).values == (21.5, 42.0)


def test_csv_loops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("x\n1\n2\n")
    sensor = CsvReplaySensor("x", path, rate_hz=10.0)
    assert [sensor.read(t).values[0] for t in range(5)] == [1.0, 2.0, 1.0, 2.0, 1.0]


def test_missing_csv_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SensorUnavailableError):
        CsvReplaySensor("x", tmp_path / "absent.csv", rate_hz=1.0)


def test_ts_replay_labels_and_segments(tmp_path: Path) -> None:
    path = tmp_path / "tiny.ts"
    path.write_text(TS_HEADER + "1,2,3:a\n4,5:b\n")
    sensor = TsReplaySensor("tiny", [path], rate_hz=10.0, loop=False)
    got = list(sensor.samples(1000))
    assert [s.values[0] for s in got] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [s.label for s in got] == [0, 0, 0, 1, 1]
    assert [s.t_ms for s in got] == [1000, 1100, 1200, 1300, 1400]
    assert [s.segment for s in got] == [1000, 1000, 1000, 1300, 1300]  # one segment per recording


def test_a_truncated_ts_file_errors_at_the_cut_and_the_earlier_series_still_play(tmp_path: Path) -> None:
    whole = (plaid_dir() / "PLAID_TRAIN.ts").read_bytes()
    cut = whole[: whole.index(b"\n", len(whole) // 2) - 40]  # ends in the middle of a series, without its label
    path = tmp_path / "PLAID_TRAIN_truncated.ts"
    path.write_bytes(cut)
    with pytest.raises(MalformedError) as err:
        read_ts(path)
    expected_line = cut.count(b"\n") + 1
    assert err.value.details["line"] == expected_line and "truncated" in err.value.message

    sensor = TsReplaySensor("plaid", [path], loop=False)
    played = 0
    failed = None
    for k in range(400_000):
        try:
            sensor.read(k)
            played += 1
        except MalformedError as exc:
            failed = exc
            break
    assert failed is not None and failed.details["line"] == expected_line
    complete = read_ts(plaid_dir() / "PLAID_TRAIN.ts").series
    complete_before_cut = [s for s in complete if s.line < expected_line]
    assert played == sum(s.values.shape[1] for s in complete_before_cut)


def test_a_ts_file_cut_inside_its_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "header_only.ts"
    path.write_text("@problemName X\n@univariate true\n@classLabel true 0 1\n")
    with pytest.raises(MalformedError, match="before @data"):
        read_ts(path)


def test_ts_label_outside_the_declared_classes(tmp_path: Path) -> None:
    path = tmp_path / "bad_label.ts"
    path.write_text(TS_HEADER + "1,2:a\n3,4:c\n")
    with pytest.raises(MalformedError) as err:
        read_ts(path)
    assert err.value.details["line"] == 8


def test_ts_replay_of_a_slice_and_unknown_class(tmp_path: Path) -> None:
    path = tmp_path / "tiny.ts"
    path.write_text(TS_HEADER + "1,2:a\n3,4:b\n5,6:a\n")
    sliced = TsReplaySensor("t", [path], series=[1, 2], loop=False)
    assert [s.values[0] for s in sliced.samples(0)] == [3.0, 4.0, 5.0, 6.0]
    only_b = TsReplaySensor("t", [path], classes=["b"], loop=False)
    assert [s.values[0] for s in only_b.samples(0)] == [3.0, 4.0]
    with pytest.raises(ValueError, match=r"unknown classes \['z'\]"):
        TsReplaySensor("t", [path], classes=["z"])


def test_csv_labels_by_class_name_with_chosen_columns_classes_and_recordings(tmp_path: Path) -> None:
    path = tmp_path / "kitchen.csv"
    path.write_text(
        "t_ms,voltage_v[V],power_w[W],label,segment\n"
        "0,230,10,kettle,1\n100,231,11,kettle,1\n200,229,50,toaster,2\n300,230,51,toaster,2\n400,230,12,kettle,3\n"
    )
    sensor = CsvReplaySensor("kitchen", path, loop=False, channels=["power_w"], classes=["kettle"])
    assert sensor.class_names == ("kettle", "toaster")  # the file's names, in order of first appearance
    assert [(c.name, c.unit) for c in sensor.channels] == [("power_w", "W")]
    got = [sensor.read(t) for t in range(3)]
    assert [(s.values, s.label, s.segment) for s in got] == [((10.0,), 0, 1), ((11.0,), 0, 1), ((12.0,), 0, 3)]
    with pytest.raises(ReplayEndedError):  # done, not broken
        sensor.read(4)

    named = CsvReplaySensor("kitchen", path, loop=False, class_names=["fan", "toaster", "kettle"])
    assert [named.read(t).label for t in range(5)] == [2, 2, 1, 1, 2]
    with pytest.raises(ValueError, match=r"no column \['current'\]"):
        CsvReplaySensor("kitchen", path, channels=["current"])


def test_csv_integer_labels_without_names_and_a_label_outside_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("x,label\n1,0\n2,1\n3,7\n")
    plain = CsvReplaySensor("x", path, rate_hz=1.0, loop=False)
    assert plain.class_names == () and [plain.read(t).label for t in range(3)] == [0, 1, 7]
    named = CsvReplaySensor("x", path, rate_hz=1.0, loop=False, class_names=["off", "on"])
    assert [named.read(t).label for t in range(2)] == [0, 1]
    with pytest.raises(MalformedError, match="not one of the classes") as err:
        named.read(2)
    assert err.value.details["line"] == 4


def test_ts_replay_names_the_files_labels_and_plays_a_range_of_series(tmp_path: Path) -> None:
    path = tmp_path / "tiny.ts"
    path.write_text(TS_HEADER + "1,2:a\n3,4:b\n5,6:a\n7:b\n")
    sensor = TsReplaySensor("t", [path], series=range(1, 1_000_000), class_names=["fan", "fridge"], loop=False)
    assert sensor.class_names == ("fan", "fridge")
    assert [(s.values[0], s.label) for s in sensor.samples(0)] == [(3.0, 1), (4.0, 1), (5.0, 0), (6.0, 0), (7.0, 1)]
    with pytest.raises(ValueError, match="3 class names for 2 labels"):
        TsReplaySensor("t", [path], class_names=["fan", "fridge", "oven"])
    with pytest.raises(SensorUnavailableError):
        TsReplaySensor("t", [tmp_path / "absent.ts"])
