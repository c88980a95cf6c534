"""Hugging Face transformers' Mamba2 as a client: its cache tensors live in the library's pools.

Runs examples/hf_mamba2.py. Needs torch and transformers (the optional ``engine`` extra); skipped
with the reason where they are missing. The Numba half needs a CUDA GPU.
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import ON_GPU

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch", reason="needs torch (pip install torch, or the 'engine' extra)")
pytest.importorskip("transformers", reason="needs transformers (pip install transformers, or the 'engine' extra)")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_mamba2.py"


def load_example():
    spec = importlib.util.spec_from_file_location("hf_mamba2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(result):
    assert result["zero_copy"]
    assert torch.equal(result["pooled"], result["own"])
    assert result["state_max_diff"] == 0.0  # same ops, same dtype, same memory layout: same bits
    assert torch.equal(result["speculative"], result["own"])
    accepts = np.array([a for round_ in result["accept_history"] for a in round_])
    # partial accepts (a scatter that moves data) and full ones (the pool already right) both happened
    assert (accepts < 4).any() and (accepts == 4).any()


def test_numpy_backend_on_cpu(rng):
    check(load_example().run("numpy", seed=int(rng.integers(2**31))))


def test_without_the_commit_the_tokens_go_wrong(rng):
    result = load_example().run("numpy", seed=int(rng.integers(2**31)), commit=False)
    assert not torch.equal(result["speculative"], result["own"])


@pytest.mark.skipif(not (ON_GPU and torch.cuda.is_available()), reason="needs a CUDA GPU (runs on the GPU machine)")
def test_numba_backend_on_gpu(rng):
    check(load_example().run("numba", seed=int(rng.integers(2**31))))
