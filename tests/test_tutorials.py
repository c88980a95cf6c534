"""Every tutorial runs as a script and ends with its own assert (tutorials/NN-topic.py)."""

import os
import pathlib
import subprocess
import sys

import pytest
from helpers import ON_GPU

TUTORIALS = sorted((pathlib.Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]-*.py"))


def test_there_are_tutorials():
    numbers = [p.name[:2] for p in TUTORIALS]
    assert len(numbers) >= 9 and numbers == [f"{n:02d}" for n in range(1, len(numbers) + 1)], numbers


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path):
    # NUMBA_ENABLE_CUDASIM is inherited from conftest: the GPU where there is one, else the simulator
    result = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=dict(os.environ), timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip(), "a tutorial prints what it shows"


TUTORIAL_04 = next(p for p in TUTORIALS if p.name.startswith("04-"))


def _run_04(recordings):
    env = dict(os.environ, MAMBA_CACHE_RECORDINGS=str(recordings))
    result = subprocess.run([sys.executable, str(TUTORIAL_04)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.skipif(ON_GPU, reason="checks the replay of recorded GPU output where there is no GPU")
def test_tutorial_04_replays_recorded_gpu_output_without_a_gpu(tmp_path):
    (tmp_path / "04-gpu.txt").write_text(
        "# recorded on Some GPU 80GB, 2026-01-02\n[zero-copy]\ntorch wrote the cache: True\n"
        "[graph]\ngraph replay == reference: True\n"
    )
    out = _run_04(tmp_path)
    assert out.count("(no GPU here: output recorded on Some GPU 80GB, 2026-01-02)") == 2
    assert "torch wrote the cache: True" in out and "graph replay == reference: True" in out
    assert "skipped" not in out
    (tmp_path / "04-gpu.txt").write_text("# not recorded yet\n")
    assert _run_04(tmp_path).count("no recorded GPU output yet") == 2


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
def test_tutorial_04_records_its_gpu_output(tmp_path):
    out = _run_04(tmp_path)
    recording = (tmp_path / "04-gpu.txt").read_text()
    assert recording.startswith("# recorded on ") and "[graph]\ngraph replay == reference: True\n" in recording
    assert "graph replay == reference: True" in out
