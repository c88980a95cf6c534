"""A benchmark run never writes over an earlier run's records (benchmarks/records.py)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.records import new_results_path  # noqa: E402


def test_a_second_run_the_same_day_gets_its_own_file(tmp_path):
    first = new_results_path(tmp_path / "results", "replay", "NVIDIA H100 80GB HBM3")
    assert first.name.startswith("replay-NVIDIA_H100_80GB_HBM3-") and first.suffix == ".json"
    first.write_text("first run")
    second = new_results_path(tmp_path / "results", "replay", "NVIDIA H100 80GB HBM3")
    second.write_text("second run")
    third = new_results_path(tmp_path / "results", "replay", "NVIDIA H100 80GB HBM3", suffix=".json")
    assert len({first, second, third}) == 3 and first.read_text() == "first run"
    assert second.stem.endswith("-2") and third.stem.endswith("-3")
