"""The cache in use: speculative decoding + scatter equals plain decoding of the accepted tokens.

On each backend the two paths must leave bit-identical states (the same kernels run in the same
order). Across backends the states agree within the float tolerance below: the GPU contracts
multiply-adds into FMAs and its exp/log1p differ from NumPy's by an ulp or so, and fp16 storage can
turn that into one fp16 ulp.
"""

import numpy as np
import pytest
from helpers import BACKENDS, snapshot

from mamba_cache import Config
from mamba_cache.models.mamba2 import TinyMamba2

TOLERANCE = {"float16": dict(rtol=4e-3, atol=4e-3), "float32": dict(rtol=2e-5, atol=2e-5)}


def tiny_config(dtype, layers=2, batch=4, verify=3):
    heads, dim, state = 2, 4, 8
    return Config(
        num_recurrent_layers=layers,
        max_batch_size=batch,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=state,
        conv_dim=heads * dim + 2 * state,
        conv_kernel=4,
        max_intermediate_seq_len=verify,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
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


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("active", [4, 3])
def test_speculative_equals_sequential(backend, rng, dtype, active):
    spec, seq, _ = run_both_paths(backend, tiny_config(dtype), rng, active=active)
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


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_backends_agree_within_float_tolerance(dtype):
    config = tiny_config(dtype)
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
    with pytest.raises(ValueError, match="conv_dim must be H \\* D \\+ 2 \\* N = 24"):
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
