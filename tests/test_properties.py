"""Differential property tests: hypothesis draws configs and call sequences; both backends must agree.

``make test`` runs a bounded, derandomized set of examples (profile ``default``: the same every run);
``make test-long`` runs the ``long`` profile (``HYPOTHESIS_PROFILE=long``, 2000 fresh random examples)
and prints hypothesis' statistics. The profiles are registered and loaded in ``conftest.py``.
"""

import numpy as np
from helpers import assert_same_bits, random_bits, snapshot, to_host
from hypothesis import given
from hypothesis import strategies as st

from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

configs = st.builds(
    Config,
    num_recurrent_layers=st.integers(1, 4),
    max_batch_size=st.integers(1, 6),
    recurrent_state_num_heads=st.integers(1, 3),
    recurrent_state_head_dim=st.integers(1, 6),
    recurrent_state_size=st.integers(1, 9),
    conv_dim=st.integers(1, 9),
    conv_kernel=st.integers(1, 4),
    max_intermediate_seq_len=st.integers(0, 5),
    recurrent_state_dtype=st.sampled_from(["float16", "float32", "float64"]),
    conv_state_dtype=st.sampled_from(["float16", "float32", "float64"]),
)

accept_values = st.one_of(
    st.sampled_from([INT32_MIN, -1, 0, 1, 2, 3, 4, 5, 6, INT32_MAX]), st.integers(INT32_MIN, INT32_MAX)
)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 3), st.integers(0, 3), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("clear")),
        st.tuples(st.just("capture"), st.sampled_from(["recurrent", "conv"]), st.integers(-1, 6)),
        st.tuples(st.just("reshape"), st.integers(0, 7), st.integers(0, 6)),
        st.tuples(st.just("scatter"), st.lists(accept_values, max_size=7), st.booleans()),
    ),
    min_size=1,
    max_size=12,
)

KINDS = ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv")


def outcome(call):
    """(result, exception type) of a call, so both backends can be compared on refusals too."""
    try:
        return call(), None
    except (ValueError, TypeError, IndexError, RuntimeError) as error:
        return None, type(error)


@given(config=configs, ops=operations)
def test_backends_agree_after_every_operation(config, ops):
    from numba import cuda

    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    for step, op in enumerate(ops):
        if op[0] == "write":
            _, kind_index, layer, seed = op
            kind = KINDS[kind_index]
            if layer >= config.num_recurrent_layers or (
                kind.startswith("intermediate") and not ref.has_intermediate_recurrent_states()
            ):
                continue
            target = getattr(ref, f"get_{kind}_state")(layer)
            values = random_bits(np.random.default_rng(seed), target.shape, target.dtype)
            target[...] = values
            getattr(dev, f"get_{kind}_state")(layer).copy_to_device(values)
        elif op[0] == "clear":
            ref.clear_states()
            dev.clear_states()
        elif op[0] == "capture":
            _, kind, slot = op
            want, want_error = outcome(lambda: getattr(ref, f"capture_{kind}_states")(slot))
            got, got_error = outcome(lambda: getattr(dev, f"capture_{kind}_states")(slot))
            assert want_error is got_error, op
            if want is not None:
                assert [w.tobytes() for w in want] == [to_host(g).tobytes() for g in got], op
        elif op[0] == "reshape":
            _, active, seq = op
            assert (
                outcome(lambda: ref.reshape_intermediate_states(active, seq))[1]
                is outcome(lambda: dev.reshape_intermediate_states(active, seq))[1]
            ), op
        else:
            _, values, on_device = op
            accept = np.array(values, dtype=np.int32)
            want_error = outcome(lambda: ref.scatter_mtp_states(accept))[1]
            got_error = outcome(
                lambda: dev.scatter_mtp_states(cuda.to_device(accept) if on_device and accept.size else accept)
            )[1]
            assert want_error is got_error, op
        assert_same_bits(snapshot(ref), snapshot(dev), f"step {step}: {op}")
        assert ref.intermediate_shape == dev.intermediate_shape
