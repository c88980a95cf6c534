"""The tiny models in replay mode: verify (writing the stash) + replay_mtp_states leaves the bits
that sequential decoding of only the accepted tokens leaves, on each backend.

On the GPU the decode kernel and the replay kernel call the same ``@cuda.jit(device=True)`` step
function (``cuda.fma``), so the proof is bit-exact there too. The CUDA simulator evaluates those
device functions in Python, where it also holds; the claims that matter for the GPU are run on the
GPU machine (the same tests, without the simulator).
"""

import dataclasses

import numpy as np
import pytest
from helpers import BACKENDS, ON_GPU, device_int32, simulator_long, snapshot

from mamba_cache import Config
from mamba_cache.models.gdn import TinyGatedDeltaNet
from mamba_cache.models.mamba2 import TinyMamba2

DTYPES = ["float16", "float32", "float64"]


MIXERS = ["mamba2", "gdn"]
MODELS = {"mamba2": TinyMamba2, "gdn": TinyGatedDeltaNet}


def tiny_config(dtype, commit_mode="replay", layers=2, batch=4, verify=3, mixer="mamba2", groups=1):
    if mixer == "gdn":  # 4 value heads sharing 2 key heads; key dim 8, value dim 4
        heads, dim, size, groups = 4, 8, 4, 2
        return Config(
            num_recurrent_layers=layers,
            max_batch_size=batch,
            recurrent_state_num_heads=heads,
            recurrent_state_head_dim=dim,
            recurrent_state_size=size,
            conv_dim=2 * groups * dim + heads * size,
            conv_kernel=4,
            max_intermediate_seq_len=verify,
            recurrent_state_dtype=dtype,
            conv_state_dtype=dtype,
            commit_mode=commit_mode,
            mixer="gdn",
            n_groups=groups,
        )
    heads, dim, state = 2 * groups, 4, 8  # groups B/C groups of two heads each
    return Config(
        num_recurrent_layers=layers,
        max_batch_size=batch,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=state,
        conv_dim=heads * dim + 2 * groups * state,
        conv_kernel=4,
        max_intermediate_seq_len=verify,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode=commit_mode,
        n_groups=groups,
    )


def main_pools(manager):
    pools = snapshot(manager)
    return {k: pools[k] for k in ("recurrent", "conv")}


@simulator_long(backend="numba", mixer="gdn", dtype="float32")
@simulator_long(backend="numba", mixer="gdn", dtype="float64")
@simulator_long(backend="numba", mixer="mamba2", dtype="float64")  # float32 covers the simulator's path
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_replay_equals_sequential(backend, rng, dtype, mixer):
    config = tiny_config(dtype, mixer=mixer)
    model = MODELS[mixer](config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    spec, seq = BACKENDS[backend](config), BACKENDS[backend](config)
    active, verify = 4, config.max_intermediate_seq_len
    prompt = rng.integers(0, 32, size=(active, 3))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    accepts = [[0, 1, verify, 2], [verify, verify, 1, 0], [2, 0, 1, verify]]  # 0 = the row is padding
    if backend == "numba" and not ON_GPU:  # the simulator: two rounds already take every accept kind
        accepts = accepts[:2]
    for accept in accepts:
        drafts = rng.integers(0, 32, size=(active, verify))
        before = main_pools(spec)
        model.verify(spec, drafts)
        for kind, values in main_pools(spec).items():  # the replay-mode verify pass never writes the pools
            assert values.tobytes() == before[kind].tobytes(), kind
        spec.replay_mtp_states(device_int32(backend, accept))
        model.decode_accepted(seq, drafts, accept)
        got, want = main_pools(spec), main_pools(seq)
        for kind in got:
            assert got[kind].tobytes() == want[kind].tobytes(), f"{backend} {dtype} {kind} after {accept}"
    assert np.abs(got["recurrent"].astype(np.float64)).sum() > 0


@simulator_long(backend="numba", dtype="float16")  # float32 takes the simulator through the G = 2 reads
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_mamba2_with_two_groups_replay_equals_sequential(backend, rng, dtype):
    """TinyMamba2 with n_groups = 2: the stash's B is [G, N] per step, and the replay reads each head's group."""
    config = tiny_config(dtype, groups=2)
    model = TinyMamba2(config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    spec, seq = BACKENDS[backend](config), BACKENDS[backend](config)
    prompt = rng.integers(0, 32, size=(4, 2))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    for accept in ([0, 1, 3, 2], [3, 2, 1, 0]):
        drafts = rng.integers(0, 32, size=(4, 3))
        model.verify(spec, drafts)
        stash_b = np.asarray(snapshot_stash_b(spec, backend))
        assert stash_b.shape == (4, 3, 2, 8) and not np.array_equal(stash_b[:, :, 0], stash_b[:, :, 1])
        spec.replay_mtp_states(device_int32(backend, accept))
        model.decode_accepted(seq, drafts, accept)
        got, want = main_pools(spec), main_pools(seq)
        for kind in got:
            assert got[kind].tobytes() == want[kind].tobytes(), f"{backend} {dtype} {kind} after {accept}"


def snapshot_stash_b(manager, backend):
    """Layer 0's stashed B ``[active, V, G, N]`` as a host array."""
    values = manager.get_replay_stash(0)["B"]
    return values if backend == "numpy" else values.copy_to_host()


@simulator_long(backend="numba", mixer="gdn")
@pytest.mark.parametrize("mixer", MIXERS)
def test_scatter_and_replay_mode_give_the_same_tokens(backend, rng, mixer):
    """A speculative loop: scatter-mode and replay-mode caches commit the same rows, then decode."""
    seed = int(rng.integers(1 << 30))
    tokens = {}
    for mode in ("scatter", "replay"):
        config = tiny_config("float32", commit_mode=mode, batch=2, verify=3, mixer=mixer)
        model = MODELS[mixer](config, vocab_size=16, seed=seed)
        cache = BACKENDS[backend](config)
        draft_rng = np.random.default_rng(seed)
        out = [draft_rng.integers(0, 16, size=2)]
        model.prefill(cache, out[0][:, None])
        for _ in range(4):
            drafts = draft_rng.integers(0, 16, size=(2, 3))
            model.verify(cache, drafts)
            accept = draft_rng.integers(1, 4, size=2).astype(np.int32)
            commit = cache.replay_mtp_states if mode == "replay" else cache.scatter_mtp_states
            commit(device_int32(backend, accept))
            logits = model.decode_step(cache, out[-1])
            host = logits if isinstance(logits, np.ndarray) else logits.copy_to_host()
            out.append(np.argmax(host[:, :16], axis=1))
        tokens[mode] = np.stack(out)
    assert tokens["scatter"].tolist() == tokens["replay"].tolist()


def test_scratch_bytes_are_reported_apart_from_the_cache():
    config = tiny_config("float16")
    model = TinyMamba2(config)
    per_row = 2 * (2 * 4 * 8 * 2 + 24 * 4 * 2)
    assert model.scratch_bytes(3) == 3 * per_row
    assert model.scratch_bytes(3) not in config.pool_bytes().values()


def test_gdn_scatter_mode_verify_matches_sequential(rng):
    """The GDN model's scatter-mode verify writes the per-step states the sequential path reaches."""
    config = tiny_config("float32", commit_mode="scatter", mixer="gdn")
    model = TinyGatedDeltaNet(config, vocab_size=32, seed=3)
    spec, seq = BACKENDS["numpy"](config), BACKENDS["numpy"](config)
    drafts = rng.integers(0, 32, size=(4, 3))
    model.verify(spec, drafts)
    spec.scatter_mtp_states(np.array([1, 2, 3, 0], dtype=np.int32))
    model.decode_accepted(seq, drafts, [1, 2, 3, 3])  # a full accept: the verify pass left it in the pool
    got, want = main_pools(spec), main_pools(seq)
    for kind in got:
        assert got[kind][:, :3].tobytes() == want[kind][:, :3].tobytes(), kind


def test_gdn_model_checks_its_config():
    with pytest.raises(ValueError, match="mixer='gdn'"):
        TinyGatedDeltaNet(tiny_config("float32"))
    with pytest.raises(ValueError, match="conv_dim must be H \\* D \\+ 2 \\* G \\* N = 40"):
        TinyMamba2(dataclasses.replace(tiny_config("float32"), n_groups=2))  # conv_dim sized for one group


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_replay_equals_the_gpu_decode_step_at_real_head_sizes(rng, mixer, dtype):
    """On the GPU: key dim 128 / state size 128 heads, replay kernel vs decode kernels, bit for bit."""
    from helpers import ON_GPU

    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (runs on the GPU machine): the simulator is too slow at these sizes")
    if mixer == "gdn":
        dims = dict(recurrent_state_num_heads=4, recurrent_state_head_dim=128, recurrent_state_size=128, n_groups=2)
        dims["conv_dim"] = 2 * 2 * 128 + 4 * 128
    else:
        dims = dict(recurrent_state_num_heads=8, recurrent_state_head_dim=64, recurrent_state_size=128, n_groups=1)
        dims["conv_dim"] = 8 * 64 + 2 * 128
    config = Config(
        num_recurrent_layers=2,
        max_batch_size=6,
        conv_kernel=4,
        max_intermediate_seq_len=4,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode="replay",
        mixer=mixer,
        **dims,
    )
    model = MODELS[mixer](config, vocab_size=64, seed=int(rng.integers(1 << 30)))
    spec, seq = BACKENDS["numba"](config), BACKENDS["numba"](config)
    prompt = rng.integers(0, 64, size=(6, 2))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    for accept in ([4, 1, 0, 3, 2, 4], [2, 4, 1, 0, 4, 3]):
        drafts = rng.integers(0, 64, size=(6, 4))
        model.verify(spec, drafts)
        spec.replay_mtp_states(device_int32("numba", accept))
        model.decode_accepted(seq, drafts, accept)
    got, want = main_pools(spec), main_pools(seq)
    for kind in got:
        assert got[kind].tobytes() == want[kind].tobytes(), f"{mixer} {dtype} {kind}"
