"""The cache in use: speculative decoding + scatter equals plain decoding of the accepted tokens.

On each backend the two paths must leave bit-identical states (the same kernels run in the same
order). Across backends the states agree within the float tolerance below: the GPU contracts
multiply-adds into FMAs and its exp/log1p differ from NumPy's by an ulp or so, and fp16 storage can
turn that into one fp16 ulp.
"""

import dataclasses

import numpy as np
import pytest
from helpers import BACKENDS, simulator_long, snapshot

from mamba_cache import Config
from mamba_cache.models.mamba2 import TinyMamba2

TOLERANCE = {"float16": dict(rtol=4e-3, atol=4e-3), "float32": dict(rtol=2e-5, atol=2e-5)}


def tiny_config(dtype, layers=2, batch=4, verify=3, groups=1):
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
        n_groups=groups,
    )


def accept_array(backend, values):
    values = np.asarray(values, dtype=np.int32)
    if backend == "numpy":
        return values
    from numba import cuda

    return cuda.to_device(values)


def run_both_paths(backend, config, rng, rounds=3, active=None):
    """Drive a speculative cache and a sequential one through the same accepted tokens."""
    model = TinyMamba2(config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    manager = BACKENDS[backend]
    spec, seq = manager(config), manager(config)
    batch, verify = config.max_batch_size, config.max_intermediate_seq_len
    active = batch if active is None else active
    prompt = rng.integers(0, 32, size=(active, 4))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    history = []
    for _ in range(rounds):
        drafts = rng.integers(0, 32, size=(active, verify))
        accept = rng.integers(1, verify + 1, size=active)  # every row live: 1..V tokens accepted
        model.verify(spec, drafts)
        spec.scatter_mtp_states(accept_array(backend, accept))
        model.decode_accepted(seq, drafts, accept)
        history.append((drafts, accept))
    return spec, seq, history


def main_pools(manager):
    pools = snapshot(manager)
    return {k: pools[k] for k in ("recurrent", "conv")}


@simulator_long(backend="numba", dtype="float16", active=4)  # float16 with 3 rows covers the simulator's path
@simulator_long(backend="numba", dtype="float32", active=4, groups=1)  # as float32 with 3 rows does
@pytest.mark.parametrize(
    ("dtype", "active", "groups"),
    [("float16", 4, 1), ("float16", 3, 1), ("float32", 4, 1), ("float32", 3, 1), ("float32", 3, 2)],
)
def test_speculative_equals_sequential(backend, rng, dtype, active, groups):
    spec, seq, _ = run_both_paths(backend, tiny_config(dtype, groups=groups), rng, active=active)
    got, want = main_pools(spec), main_pools(seq)
    for kind in got:
        assert got[kind].tobytes() == want[kind].tobytes(), f"{backend} {kind} state differs"
        assert np.isfinite(got[kind]).all() and np.abs(got[kind].astype(np.float64)).sum() > 0


def test_a_wrong_scatter_is_caught(rng):
    """The check above can fail: committing one step too far breaks equality."""
    config = tiny_config("float32")
    model = TinyMamba2(config, vocab_size=32, seed=1)
    spec, seq = BACKENDS["numpy"](config), BACKENDS["numpy"](config)
    drafts = rng.integers(0, 32, size=(4, 3))
    model.verify(spec, drafts)
    spec.scatter_mtp_states(np.array([2, 2, 2, 2], dtype=np.int32))
    for row in range(4):
        model.decode_step(seq, [drafts[row, 0]], slots=[row])  # only one token: not what was committed
    assert main_pools(spec)["recurrent"].tobytes() != main_pools(seq)["recurrent"].tobytes()


@pytest.mark.parametrize(("dtype", "groups"), [("float16", 1), ("float32", 1), ("float32", 2)])
def test_backends_agree_within_float_tolerance(dtype, groups):
    config = tiny_config(dtype, groups=groups)
    states = {}
    for backend in ("numpy", "numba"):
        rng = np.random.default_rng(7)  # the same tokens and accept lengths on both
        spec, _, _ = run_both_paths(backend, config, rng, rounds=2)
        states[backend] = main_pools(spec)
    for kind in ("recurrent", "conv"):
        np.testing.assert_allclose(
            states["numba"][kind].astype(np.float64), states["numpy"][kind].astype(np.float64), **TOLERANCE[dtype]
        )


def test_conv_dim_must_match_the_mixer():
    with pytest.raises(ValueError, match="conv_dim must be H \\* D \\+ 2 \\* G \\* N = 24"):
        TinyMamba2(
            Config(
                num_recurrent_layers=1,
                max_batch_size=1,
                recurrent_state_num_heads=2,
                recurrent_state_head_dim=4,
                recurrent_state_size=8,
                conv_dim=23,
                conv_kernel=4,
                max_intermediate_seq_len=0,
            )
        )
    with pytest.raises(ValueError, match="conv_dim must be H \\* D \\+ 2 \\* G \\* N = 48"):
        TinyMamba2(dataclasses.replace(tiny_config("float32", groups=2), conv_dim=24))  # sized for one group


def test_each_head_reads_its_own_b_c_group(rng):
    """One step of a 2-group TinyMamba2 from a zero state against a per-head loop written out here.

    With ``h = 0`` the step is ``h = (dt * x) (outer) b_in[g]`` and ``y = h . c_out[g] + d_skip * x`` for the
    head's group ``g = i // (H / G)``; equal-valued groups would hide a wrong mapping, so the groups differ.
    """
    from mamba_cache.models.mamba2 import matvec, rmsnorm, silu, softplus

    config = tiny_config("float32", layers=1, batch=1, groups=2)
    model = TinyMamba2(config, vocab_size=32, seed=3)
    cache = BACKENDS["numpy"](config)
    out = model.decode_step(cache, [5])
    w, heads, dim, size, groups = model.weights, 4, 4, 8, 2
    width, channels = heads * dim, config.conv_dim
    hidden = w["embedding"][[5]]
    z = matvec(rmsnorm(hidden), w["in_proj"][0])[0]
    xbc = silu(z[:channels] * w["conv_weight"][0][:, -1] + w["conv_bias"][0])  # zero window but the new column
    dt = softplus(z[channels:] + w["dt_bias"][0])
    b_all = xbc[width : width + groups * size].reshape(groups, size)
    c_all = xbc[width + groups * size :].reshape(groups, size)
    assert not np.allclose(b_all[0], b_all[1]) and not np.allclose(c_all[0], c_all[1])
    state, y = np.zeros((heads, dim, size)), np.zeros((heads, dim))
    for i in range(heads):
        g = i // (heads // groups)
        x = xbc[i * dim : (i + 1) * dim].astype(np.float64)
        state[i] = np.outer(dt[i] * x, b_all[g])
        y[i] = state[i] @ c_all[g] + w["d_skip"][0][i] * x
    np.testing.assert_allclose(cache.get_recurrent_state(0)[0], state, rtol=1e-5, atol=1e-6)
    want = hidden[0] + y.reshape(-1) @ w["out_proj"][0].astype(np.float64)
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)
