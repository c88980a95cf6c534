"""Tensor parallelism: examples/tp_tiny_mamba2.py, the tiny Mamba2 sharded over ranks.

The sharding logic runs everywhere (NumPy ranks in one process, the all-reduce a sum); the real
thing (one process per GPU, NCCL, the Numba backend) needs two GPUs and torch.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ON_GPU

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tp_tiny_mamba2.py"


def load_example():
    spec = importlib.util.spec_from_file_location("tp_tiny_mamba2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if ON_GPU else 0


@pytest.mark.parametrize("tp", [2, 4])
def test_simulated_ranks_give_the_unsharded_tokens(rng, tp):
    example = load_example()
    result = example.run_simulated(seed=int(rng.integers(2**31)), tp=tp)
    example.check(result)  # tokens equal; states within RTOL / ATOL
    accepts = np.array(result["accept_history"]).ravel()
    assert (accepts < example.VERIFY_LEN).any() and (accepts == example.VERIFY_LEN).any()


def test_one_rank_is_the_model_bit_for_bit(rng):
    # tp = 1 runs the example's per-rank layer code on the whole model: it must be TinyMamba2's own step
    example = load_example()
    result = example.run_simulated(seed=int(rng.integers(2**31)), tp=1)
    assert np.array_equal(result["sharded"], result["reference"])
    for want, got in zip(sum(result["reference_states"], []), sum(result["sharded_states"], []), strict=True):
        assert np.array_equal(got, want)


def test_a_missing_rank_changes_the_tokens(rng):
    # the comparison can fail: drop rank 1's share of every all-reduce
    example = load_example()
    seed = int(rng.integers(2**31))
    result = example.run_simulated(seed=seed)
    model = example.TinyMamba2(example.model_config(), seed=seed)
    engine = example.SimulatedTP(model, 2, example.lm_head(model, seed))
    engine.ranks = engine.ranks[:1]
    prompt = np.random.default_rng(seed).integers(0, model.vocab_size, size=(3, 5))
    assert not np.array_equal(example.greedy(engine, prompt, 16), result["reference"])


def test_rank_configs_and_weights_partition_the_model():
    example = load_example()
    config = example.model_config()
    model = example.TinyMamba2(config, seed=0)
    shards = [example.shard_weights(model, 2, r) for r in range(2)]
    rank_config = example.rank_config(config, 2, 1)
    assert (rank_config.tp_size, rank_config.tp_rank) == (2, 1)
    assert rank_config.conv_dim == shards[0]["conv_weight"].shape[1]
    assert rank_config.recurrent_state_num_heads == shards[0]["a"].shape[1] == 2
    assert np.array_equal(np.concatenate([s["out_proj"] for s in shards], axis=1), model.weights["out_proj"])
    assert np.array_equal(np.concatenate([s["a"] for s in shards], axis=1), model.weights["a"])
    assert np.array_equal(np.concatenate([s["d_skip"] for s in shards], axis=1), model.weights["d_skip"])
    assert np.array_equal(shards[0]["conv_weight"][:, -8:], shards[1]["conv_weight"][:, -8:])  # B, C replicated


@pytest.mark.skipif(gpu_count() < 2, reason="needs two CUDA GPUs and torch (runs on the 2-GPU machine)")
def test_two_gpus_nccl(rng):
    seed = str(int(rng.integers(2**31)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tp", "2", "--seed", seed],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("OK"), proc.stdout


@pytest.mark.parametrize("numba_rank", [0, 1])
def test_numba_rank_with_a_numpy_peer(rng, numba_rank):
    # The GPU path (NumbaRank: the model's Numba kernels on its slices) without NCCL: one rank on
    # the Numba backend, the other a NumPy rank stepped in lockstep inside the all-reduce hook,
    # the partials summed in rank order. Simulator or GPU.
    example = load_example()
    seed = int(rng.integers(2**31))
    reference = example.run_simulated(seed=seed, steps=6)
    model = example.TinyMamba2(example.model_config(), seed=seed)
    peer = example.NumpyRank(model, 2, 1 - numba_rank)
    layers = model.config.num_recurrent_layers
    calls = []

    def reduce_add(u, partial):
        u_in = u.copy_to_host()
        mine = partial.copy_to_host()
        theirs = peer.partial(len(calls) % layers, u_in, np.arange(u_in.shape[0]), None)
        calls.append(1)
        u.copy_to_device(u_in + (mine + theirs if numba_rank == 0 else theirs + mine))

    engine = example.NumbaRank(model, 2, numba_rank, example.lm_head(model, seed), reduce_add)
    prompt = np.random.default_rng(seed).integers(0, model.vocab_size, size=(3, 5))
    assert np.array_equal(example.greedy(engine, prompt, 6), reference["reference"][:, :6])
    assert len(calls) == layers * (5 + 5)  # one all-reduce per layer and token
