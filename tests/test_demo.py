"""``make demo`` runs mamba_cache.demo: it must keep passing on every backend available."""

import pytest
from conftest import ON_GPU

from mamba_cache import demo


def test_demo_on_the_numpy_reference(capsys):
    assert demo.main(["--backend", "numpy", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "0 mismatches" in out and out.rstrip().endswith("OK")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the demo's state sizes are too large for the simulator")
def test_demo_on_the_gpu(capsys):
    assert demo.main(["--backend", "numba"]) == 0
    assert "Numba CUDA backend on" in capsys.readouterr().out
