"""Every tutorial runs as a script and ends with its own assert (tutorials/NN-topic.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

TUTORIALS = sorted((pathlib.Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]-*.py"))


def test_there_are_tutorials():
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(path):
    # NUMBA_ENABLE_CUDASIM is inherited from conftest: the GPU where there is one, else the simulator
    result = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=dict(os.environ), timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip(), "a tutorial prints what it shows"
