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


def load_example(path=EXAMPLE):
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
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


QUANT8_EXAMPLE = EXAMPLE.parent / "hf_mamba2_quant8.py"


def test_8bit_pools_under_the_model(rng):
    """The model decodes from the library's 8-bit pools: each commit quantises the state the model wrote."""
    example = load_example(QUANT8_EXAMPLE)
    torch.manual_seed(int(rng.integers(2**31)))
    config = example.study_config(layers=1, heads=2, head_dim=8, state=16)
    model = __import__("transformers").Mamba2ForCausalLM(config).eval()
    run = example.PooledStates(example._hf_example(), model, 2, ("int8", False, False))
    tokens = torch.from_numpy(rng.integers(1, config.vocab_size, 2))
    run.step(model, tokens, 0)
    run.step(model, tokens, 1)
    pool = run.manager
    assert pool.get_recurrent_state(0).dtype == np.int8 and pool.get_conv_state(0).dtype == np.int8
    written = run.work_rec[0]  # what the model computed for the last token, in the library's per-step buffer
    scales = pool.get_recurrent_scales(0)[..., None]
    assert np.abs(written).max() > 0
    assert (np.abs(run.read(0)[1] - written) <= scales / 2 * 1.0001).all()  # nearest: within half a step


def test_8bit_study_at_tiny_size(rng):
    example = load_example(QUANT8_EXAMPLE)
    names = ("float32", "bfloat16 nearest", "e4m3 stochastic", "int8 nearest + error feedback")
    result = example.study(
        steps=4,
        batch=2,
        prompt_len=2,
        seed=int(rng.integers(2**31)),
        runs={name: example.RUNS[name] for name in names},
        config=example.study_config(layers=1, heads=2, head_dim=8, state=16),
    )
    runs = result["runs"]
    assert runs["float32"]["state_error_mean"] == 0.0 and runs["float32"]["teacher_forced_agreement"] == 1.0
    bf16 = runs["bfloat16 nearest"]["state_error_mean"]
    for name in names[2:]:  # an 8-bit pool costs more than a bfloat16 one, and far less than the state
        assert bf16 < runs[name]["state_error_mean"] < 0.5, name
        assert len(runs[name]["first_divergence"]) == 2
