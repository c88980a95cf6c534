"""``make demo`` runs mamba_cache.demo: it must keep passing on every backend available."""

import pytest
from helpers import ON_GPU

from mamba_cache import demo


def test_demo_on_the_numpy_reference(capsys):
    assert demo.main(["--backend", "numpy", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "0 mismatches" in out and out.rstrip().endswith("OK")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the demo's state sizes are too large for the simulator")
def test_demo_on_the_gpu(capsys):
    assert demo.main(["--backend", "numba"]) == 0
    assert "Numba CUDA backend on" in capsys.readouterr().out


def test_demo_says_what_it_checks_and_times(capsys):
    assert demo.main(["--backend", "numpy", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "cache sized like Mamba2-370M: 2 recurrent layers, 32 heads x 64" in out
    assert "the rule: a row with 1 <= accept_lengths < V takes its intermediate state" in out
    assert "cache operations (allocate, reshape, one scatter_mtp_states over 2 layers, capture, clear) took" in out
    assert "not timed" in out
