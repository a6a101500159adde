"""The startup measurement of the forward pass, kept on disk per model, backend and machine."""

from __future__ import annotations

from pathlib import Path

from embedserve.engine.calibration import cached_measurement
from embedserve.engine.cost import Measured

IDENTITY = {"model": "m", "backend": ["onnx", "CPUExecutionProvider", "fp32"], "threads": 1}


class Counting:
    def __init__(self, seconds: float) -> None:
        self.calls = 0
        self.seconds = seconds

    def __call__(self) -> list[Measured]:
        self.calls += 1
        return [(1, 16, self.seconds), (4, 64, 2 * self.seconds)]


def test_a_second_start_reads_what_the_first_measured(tmp_path: Path) -> None:
    first = Counting(0.001)
    measured, kept = cached_measurement(tmp_path, IDENTITY, first)
    assert (measured, kept, first.calls) == ([(1, 16, 0.001), (4, 64, 0.002)], None, 1)
    again = Counting(0.5)
    measured, kept = cached_measurement(tmp_path, IDENTITY, again)
    assert measured == [(1, 16, 0.001), (4, 64, 0.002)] and again.calls == 0
    assert kept is not None and kept.parent == tmp_path / "calibration" and kept.is_file()


def test_another_model_backend_or_thread_count_is_measured_anew(tmp_path: Path) -> None:
    cached_measurement(tmp_path, IDENTITY, Counting(0.001))
    for change in ({"threads": 2}, {"backend": ["onnx", "CPUExecutionProvider", "int8"]}, {"model": "n"}):
        measure = Counting(0.003)
        measured, kept = cached_measurement(tmp_path, {**IDENTITY, **change}, measure)
        assert (measure.calls, kept, measured[0][2]) == (1, None, 0.003), change


def test_a_damaged_file_is_measured_around_and_replaced(tmp_path: Path) -> None:
    cached_measurement(tmp_path, IDENTITY, Counting(0.001))
    (kept,) = (tmp_path / "calibration").iterdir()
    kept.write_text('{"key": ')
    measure = Counting(0.004)
    assert cached_measurement(tmp_path, IDENTITY, measure) == ([(1, 16, 0.004), (4, 64, 0.008)], None)
    assert cached_measurement(tmp_path, IDENTITY, Counting(9.0))[0][0][2] == 0.004


def test_a_cache_folder_that_cannot_be_written_still_gives_a_measurement(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    measure = Counting(0.001)
    assert cached_measurement(blocked, IDENTITY, measure)[1] is None
    assert cached_measurement(blocked, IDENTITY, measure)[1] is None and measure.calls == 2
