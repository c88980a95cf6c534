"""The bad-input matrix: every public function x every kind of bad argument, on both backends.

Each case names the one exception type it expects and a message that names the argument, and the
manager's every buffer (all layers, all slots, the intermediate buffers) must be bit-identical
before and after the refused call. ``pytest --collect-only -q tests/test_bad_inputs.py`` counts them.
"""

import numpy as np
import pytest
from helpers import BACKENDS, ON_GPU, assert_same_bits, fill_random, small_config, snapshot

from mamba_cache import Config, ConfigError

INT32 = np.int32
BIG = 2**63


def host(values, dtype=INT32):
    return np.asarray(values, dtype=dtype)


def device(values, dtype=INT32):
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(np.asarray(values, dtype=dtype)))


class ForeignArray:
    """A device array from some other library, as seen through __cuda_array_interface__ only."""

    def __init__(self, typestr, shape, strides=None):
        self.__cuda_array_interface__ = {
            "typestr": typestr,
            "shape": shape,
            "strides": strides,
            "data": (0, False),
            "version": 3,
        }


LAYER_GETTERS = [
    "get_recurrent_state",
    "get_conv_state",
    "get_intermediate_recurrent_state",
    "get_intermediate_conv_state",
]

# (id, backends or None for both, call(manager), exception, message regex)
CASES = []
for getter in LAYER_GETTERS:
    for bad, exc, msg in [
        ("0", TypeError, "recurrent_layer_idx must be an integer"),
        (1.0, TypeError, "recurrent_layer_idx must be an integer"),
        (True, TypeError, "recurrent_layer_idx must be an integer"),
        (None, TypeError, "recurrent_layer_idx must be an integer"),
        (-1, IndexError, r"recurrent_layer_idx must be in \[0, 3\), got -1"),
        (3, IndexError, r"recurrent_layer_idx must be in \[0, 3\), got 3"),
        (BIG, IndexError, r"recurrent_layer_idx must be in \[0, 3\)"),
    ]:
        CASES.append((f"{getter}({bad!r})", None, lambda m, g=getter, b=bad: getattr(m, g)(b), exc, msg))

for kind in ("recurrent", "conv"):
    for bad, exc, msg in [
        ("1", TypeError, "batch_idx must be an integer"),
        (None, TypeError, "batch_idx must be an integer"),
        (2.0, TypeError, "batch_idx must be an integer"),
        (-1, IndexError, r"batch_idx must be in \[0, 5\), got -1"),
        (5, IndexError, r"batch_idx must be in \[0, 5\), got 5"),
        (-(2**31), IndexError, r"batch_idx must be in \[0, 5\)"),
    ]:
        CASES.append(
            (
                f"capture_{kind}_states({bad!r})",
                None,
                lambda m, k=kind, b=bad: getattr(m, f"capture_{k}_states")(b),
                exc,
                msg,
            )
        )

for args, exc, msg in [
    ((0, 2), ValueError, r"active_batch_size must be in \[1, 5\], got 0"),
    ((6, 2), ValueError, r"active_batch_size must be in \[1, 5\], got 6"),
    ((-1, 2), ValueError, r"active_batch_size must be in \[1, 5\], got -1"),
    ((2, 0), ValueError, r"seq_len must be in \[1, 4\], got 0"),
    ((2, 5), ValueError, r"seq_len must be in \[1, 4\], got 5"),
    (("2", 2), TypeError, "active_batch_size must be an integer"),
    ((2, 2.5), TypeError, "seq_len must be an integer"),
    ((True, 2), TypeError, "active_batch_size must be an integer"),
]:
    CASES.append(
        (f"reshape_intermediate_states{args!r}", None, lambda m, a=args: m.reshape_intermediate_states(*a), exc, msg)
    )

for name, make, exc, msg in [
    ("int64", lambda: host([1, 2], np.int64), TypeError, "accept_lengths must have dtype int32, got int64"),
    ("uint32", lambda: host([1, 2], np.uint32), TypeError, "accept_lengths must have dtype int32, got uint32"),
    ("float32", lambda: host([1, 2], np.float32), TypeError, "accept_lengths must have dtype int32, got float32"),
    ("2-D", lambda: host([[1, 2], [3, 4]]), ValueError, r"accept_lengths must be 1-D \[active\], got shape \(2, 2\)"),
    ("0-D", lambda: host(1), ValueError, r"accept_lengths must be 1-D \[active\], got shape \(\)"),
    (
        "too long",
        lambda: host([1] * 6),
        ValueError,
        r"accept_lengths must have length in \[0, 5\] \(the active batch of the latest reshape",
    ),
    ("strided", lambda: host([1] * 8)[::2], ValueError, "accept_lengths must be contiguous"),
    ("list", lambda: [1, 2], TypeError, "accept_lengths must be a"),
    ("None", lambda: None, TypeError, "accept_lengths must be a"),
    ("int32 scalar", lambda: INT32(2), TypeError, "accept_lengths must be a"),
]:
    CASES.append((f"scatter_mtp_states(host {name})", None, lambda m, f=make: m.scatter_mtp_states(f()), exc, msg))

CASES += [
    (
        "scatter_mtp_states(device array) on NumPy",
        ["numpy"],
        lambda m: m.scatter_mtp_states(ForeignArray("<i4", (2,))),
        TypeError,
        "host numpy.ndarray for the NumPy backend",
    ),
    (
        "scatter_mtp_states(device int64)",
        ["numba"],
        lambda m: m.scatter_mtp_states(device([1, 2], np.int64)),
        TypeError,
        "accept_lengths must have dtype int32, got int64",
    ),
    (
        "scatter_mtp_states(device 2-D)",
        ["numba"],
        lambda m: m.scatter_mtp_states(device([[1, 2]])),
        ValueError,
        r"accept_lengths must be 1-D",
    ),
    (
        "scatter_mtp_states(device too long)",
        ["numba"],
        lambda m: m.scatter_mtp_states(device([1] * 6)),
        ValueError,
        r"accept_lengths must have length in \[0, 5\]",
    ),
    (
        "scatter_mtp_states(foreign float32)",
        ["numba-gpu"],
        lambda m: m.scatter_mtp_states(ForeignArray("<f4", (2,))),
        TypeError,
        "accept_lengths must have dtype int32, got float32",
    ),
    (
        "scatter_mtp_states(foreign strided)",
        ["numba-gpu"],
        lambda m: m.scatter_mtp_states(ForeignArray("<i4", (2,), (8,))),
        ValueError,
        "accept_lengths must be contiguous",
    ),
]

for method, call in [
    ("clear_states", lambda m, s: m.clear_states(stream=s)),
    ("capture_recurrent_states", lambda m, s: m.capture_recurrent_states(0, stream=s)),
    ("scatter_mtp_states", lambda m, s: m.scatter_mtp_states(host([1, 2]), stream=s)),
]:
    for bad in ("default", 1.5, object()):
        CASES.append(
            (
                f"{method}(stream={type(bad).__name__})",
                ["numba-gpu"],
                lambda m, c=call, b=bad: c(m, b),
                TypeError,
                "stream must be None, a numba.cuda stream",
            )
        )

for bad, exc, msg in [
    (-1, IndexError, r"slot must be in \[0, 5\), got -1"),
    (5, IndexError, r"slot must be in \[0, 5\), got 5"),
    ("1", TypeError, "slot must be an integer"),
]:
    CASES.append((f"clear_slot({bad!r})", None, lambda m, b=bad: m.clear_slot(b), exc, msg))
    CASES.append((f"restore_slot({bad!r}, [], [])", None, lambda m, b=bad: m.restore_slot(b, [], []), exc, msg))
    CASES.append((f"save_slot(..., {bad!r})", None, lambda m, b=bad: m.save_slot("unused.npz", b), exc, msg))
    CASES.append((f"load_slot(..., {bad!r})", None, lambda m, b=bad: m.load_slot("unused.npz", b), exc, msg))
CASES += [
    (
        "restore_slot(0, 'x', [])",
        None,
        lambda m: m.restore_slot(0, "x", []),
        TypeError,
        "recurrent_states must be a list",
    ),
    (
        "restore_slot(0, [], [None] * 4)",
        None,
        lambda m: m.restore_slot(0, [], [None] * 4),
        ValueError,
        "conv_states has 4 arrays but the cache has 3 layers",
    ),
    (
        "restore_slot(0, [None], [])",
        None,
        lambda m: m.restore_slot(0, [None], []),
        TypeError,
        r"recurrent_states\[0\] must be a",
    ),
    (
        "scatter_mtp_states(state_indices int64)",
        None,
        lambda m: m.scatter_mtp_states(host([1]), state_indices=host([0], np.int64)),
        TypeError,
        "state_indices must have dtype int32",
    ),
    (
        "scatter_mtp_states(state_indices short)",
        None,
        lambda m: m.scatter_mtp_states(host([1, 2]), state_indices=host([0])),
        ValueError,
        "state_indices must have the length",
    ),
    (
        "scatter_accepted_tree_states(1-D ids)",
        None,
        lambda m: m.scatter_accepted_tree_states(host([0, 1]), host([1, 1])),
        ValueError,
        "accepted_node_ids must be 2-D",
    ),
    (
        "scatter_accepted_tree_states(ids rows)",
        None,
        lambda m: m.scatter_accepted_tree_states(host([[0], [1], [2]]), host([1, 1])),
        ValueError,
        "accepted_node_ids must have len",
    ),
    (
        "scatter_accepted_tree_states(accept float)",
        None,
        lambda m: m.scatter_accepted_tree_states(host([[0]]), host([1], np.float32)),
        TypeError,
        "accept_lengths must have dtype int32",
    ),
    (
        "load_slot(missing file)",
        None,
        lambda m: m.load_slot("/nonexistent/file.npz", 0),
        ValueError,
        "not a readable mamba_cache snapshot",
    ),
]

# Moving states: export / import / offload / resume (issue #27).
CASES += [
    ("export_slots(list)", None, lambda m: m.export_slots([0]), TypeError, "slots must be a host numpy.ndarray"),
    ("export_slots(int64)", None, lambda m: m.export_slots(host([0], np.int64)), TypeError, "must have dtype int32"),
    ("export_slots(5)", None, lambda m: m.export_slots(host([5])), IndexError, r"slots must be in \[0, 5\) or pad"),
    ("export_slots(-2)", None, lambda m: m.export_slots(host([-2])), IndexError, r"slots must be in \[0, 5\) or pad"),
    ("export_slots(dest_tp_size=0)", None, lambda m: m.export_slots(host([0]), dest_tp_size=0), ValueError,
     r"dest_tp_size must be in \[1, "),
    ("export_slots(dest_tp_size=2, no layout)", None, lambda m: m.export_slots(host([0]), dest_tp_size=2), ValueError,
     "cannot hold the model's conv"),
    ("export_slots(positions int32)", None, lambda m: m.export_slots(host([0]), positions=host([1])), TypeError,
     "positions must be a host numpy.ndarray of int64"),
    ("export_slots(positions < 0)", None, lambda m: m.export_slots(host([0]), positions=host([-1], np.int64)),
     ValueError, "positions must be >= 0"),
    ("export_slots(keys short)", None, lambda m: m.export_slots(host([0, 1]), keys=[b"k" * 16]), TypeError,
     "keys must be a list of 2"),
    ("export_slots(keys str)", None, lambda m: m.export_slots(host([0]), keys=["k"]), TypeError,
     r"keys\[0\] must be bytes or None"),
    ("export_slots(namespace 1)", None, lambda m: m.export_slots(host([0]), namespace=1), TypeError,
     "namespace must be a str"),
    ("import_slots('x')", None, lambda m: m.import_slots("x", host([0])), TypeError, "parcel must be"),
    ("offload_slots(5)", None, lambda m: m.offload_slots(host([5])), IndexError, r"slots must be in \[0, 5\)"),
    ("offload_slots(list)", None, lambda m: m.offload_slots([0]), TypeError, "slots must be a host numpy.ndarray"),
    ("resume('x', 0)", None, lambda m: m.resume("x", 0), TypeError, "handle must be an OffloadHandle"),
    ("reserve_offload(0)", None, lambda m: m.reserve_offload(0), ValueError, r"capacity must be in \[1, "),
]  # fmt: skip

# A closed or moved-from manager answers queries as an empty one, but every layer access and
# every state operation raises ValueError (as a closed file does): silently doing nothing hides bugs.
CLOSED_CALLS = [(f"{getter}(0)", lambda m, g=getter: getattr(m, g)(0)) for getter in LAYER_GETTERS] + [
    ("clear_states()", lambda m: m.clear_states()),
    ("capture_recurrent_states(0)", lambda m: m.capture_recurrent_states(0)),
    ("capture_conv_states(0)", lambda m: m.capture_conv_states(0)),
    ("reshape_intermediate_states(1, 1)", lambda m: m.reshape_intermediate_states(1, 1)),
    ("scatter_mtp_states([1])", lambda m: m.scatter_mtp_states(host([1]))),
    ("scatter_accepted_tree_states", lambda m: m.scatter_accepted_tree_states(host([[0]]), host([1]))),
    ("clear_slot(0)", lambda m: m.clear_slot(0)),
    ("restore_slot(0, [], [])", lambda m: m.restore_slot(0, [], [])),
    ("export_slots([0])", lambda m: m.export_slots(host([0]))),
    ("import_slots(None, [0])", lambda m: m.import_slots(None, host([0]))),
    ("offload_slots([0])", lambda m: m.offload_slots(host([0]))),
]
for how in ("closed", "moved from"):
    for label, call in CLOSED_CALLS:
        CASES.append((f"{label} on a {how} manager", None, (how, call), ValueError, "closed or moved from"))


def applies(backends, backend):
    if backends is None:
        return True
    return backend in backends or (backend == "numba" and "numba-gpu" in backends and ON_GPU)


@pytest.mark.parametrize(("case_id", "backends", "call", "exc", "msg"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(backend, rng, case_id, backends, call, exc, msg):
    if not applies(backends, backend):
        pytest.skip(
            f"not a bad input for the {backend} backend"
            + (" under the simulator" if backend == "numba" and not ON_GPU else "")
        )
    manager = BACKENDS[backend](small_config())
    fill_random([manager], rng)
    if isinstance(call, tuple):  # a closed or moved-from manager
        how, closed_call = call
        other = manager.move() if how == "moved from" else None
        if other is None:
            manager.close()
        with pytest.raises(exc, match=msg):
            closed_call(manager)
        assert manager.num_layers() == 0 and not manager.has_intermediate_recurrent_states()  # queries: empty
        if other is not None:
            assert other.num_layers() == 3
        return
    before = snapshot(manager)
    shape = manager.intermediate_shape
    with pytest.raises(exc, match=msg):
        call(manager)
    assert_same_bits(snapshot(manager), before, case_id)
    assert manager.intermediate_shape == shape


CONFIG_FIELDS = [
    "max_batch_size",
    "recurrent_state_num_heads",
    "recurrent_state_head_dim",
    "recurrent_state_size",
    "conv_dim",
    "conv_kernel",
]
CONFIG_CASES = (
    [(f"{f}={v!r}", {f: v}, f"{f} must be >= 1, got {v}") for f in CONFIG_FIELDS for v in (0, -3)]
    + [
        (f"{f}=2.0", {f: 2.0}, f"{f} must be an integer")
        for f in [*CONFIG_FIELDS, "num_recurrent_layers", "max_intermediate_seq_len"]
    ]
    + [
        ("num_recurrent_layers=-1", {"num_recurrent_layers": -1}, "num_recurrent_layers must be >= 0, got -1"),
        ("max_intermediate_seq_len=-1", {"max_intermediate_seq_len": -1}, "max_intermediate_seq_len must be >= 0"),
        ("recurrent_state_dtype=int16", {"recurrent_state_dtype": "int16"}, "recurrent_state_dtype must be one of"),
        ("conv_state_dtype=bogus", {"conv_state_dtype": "bogus"}, "conv_state_dtype must be a NumPy dtype"),
    ]
)


@pytest.mark.parametrize(("case_id", "override", "msg"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_each_config_field_invalid(case_id, override, msg):
    fields = {**small_config().__dict__, **override}
    with pytest.raises(ConfigError, match=msg):
        Config(**fields)


@pytest.mark.parametrize("bad", [{"num_recurrent_layers": 1}, "config", 3])
def test_constructor_refuses_a_non_config(backend, bad):
    with pytest.raises(TypeError, match="config must be a mamba_cache.Config"):
        BACKENDS[backend](bad)


def test_absurd_config_refused_before_allocating(backend):
    """More memory than exists: a clear error with the bytes asked for, and nothing allocated."""
    if backend == "numba" and not ON_GPU:
        pytest.skip("the simulator has no device memory to run out of")
    huge = small_config(
        num_recurrent_layers=64,
        max_batch_size=4096,
        recurrent_state_num_heads=128,
        recurrent_state_head_dim=128,
        recurrent_state_size=256,
    )
    free_before = None
    if backend == "numba":
        from numba import cuda

        free_before = cuda.current_context().get_memory_info()[0]
    with pytest.raises(
        MemoryError, match=rf"needs .* \({huge.total_bytes} bytes\) but only .* available; nothing was allocated"
    ):
        BACKENDS[backend](huge)
    if free_before is not None:
        assert cuda.current_context().get_memory_info()[0] == free_before
