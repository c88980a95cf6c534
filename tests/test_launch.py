"""The prepared launch's layout check and its fallback to the plain dispatcher launch.

The prepared launch (core/launch.py) writes Numba's marshalled kernel parameters itself, so it
depends on the order Numba marshals an array argument in. ``parameter_layout`` states that order;
these tests hold it against the PTX ``.param`` list Numba compiles (no GPU needed), show that a
block marshalled in another order is refused, and (on a GPU) that the fallback launch is correct.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import assert_same_bits, fill_random, needs_gpu, small_config, snapshot, to_host
from numba import types

from mamba_cache import NumbaMambaCacheManager, NumpyMambaCacheManager
from mamba_cache.core import launch
from mamba_cache.core.launch import (
    ArrayFacts,
    DispatcherLaunch,
    LaunchLayoutError,
    check_parameter_block,
    parameter_layout,
    ptx_parameter_sizes,
)


def test_parameter_layout_matches_the_compiled_ptx():
    """Compile each kernel for sm_90 (NVVM, no GPU) and compare its .param list with the layout."""
    script = textwrap.dedent("""
        from numba import cuda, types
        from mamba_cache.core import kernels
        from mamba_cache.core.launch import parameter_layout, ptx_parameter_sizes
        w3 = types.uint32[:, :, ::1]
        i1 = types.int32[::1]
        sigs = {
            "scatter_accepted": (w3, w3, w3, w3, types.int64, i1, i1, types.int64, types.int64, types.int64),
            "scatter_tree": (w3, w3, w3, w3, types.int64, types.int32[:, ::1], i1, i1, types.int64, types.int64),
            "copy_slot": (w3, w3, types.int32),
            "zero_words": (types.uint64[::1], types.uint16[::1], types.int64),
            "zero_slot": (w3, w3, types.int64, types.int32),
            "copy_rows_scaled": (*[w3, types.uint64[:, :, ::1]] * 5, *[types.int64] * 4, i1, i1, *[types.int64] * 3),
            "zero_slot_scaled": (*[w3] * 5, *[types.int64] * 4, types.int32),
        }
        for name, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(getattr(kernels, name).py_func, sig, cc=(9, 0))
            sizes = ptx_parameter_sizes(ptx)
            assert sizes == [size for _, size in parameter_layout(sig)], (name, sizes)
            print(name, len(sizes), "ok")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if "NvvmSupportError" in result.stderr or "libNVVM" in result.stderr:
        pytest.skip("NVVM is not installed: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    # 11 per rank-3 array, 9 per rank-2, 7 per rank-1, 1 per scalar: spelled out so a change shows
    assert "scatter_accepted 62 ok" in result.stdout, result.stdout
    assert "scatter_tree 70 ok" in result.stdout, result.stdout
    assert "copy_slot 23 ok" in result.stdout, result.stdout
    assert "copy_rows_scaled 131 ok" in result.stdout, result.stdout
    assert "zero_slot_scaled 60 ok" in result.stdout, result.stdout
    assert result.stdout.count("ok") == 7


def test_ptx_parameter_sizes_reads_widths():
    ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u16 k_param_2\n)\n{"
    assert ptx_parameter_sizes(ptx) == [8, 4, 2]


# A kernel (dst [L, B, W] uint64, slot int64, src [n] int32) and its arguments' facts.
SIG = (types.uint64[:, :, ::1], types.int64, types.int32[::1])
DST = ArrayFacts(nitems=2 * 3 * 5, itemsize=8, data=0x7F0000001000, shape=(2, 3, 5), strides=(120, 40, 8))
SRC = ArrayFacts(nitems=7, itemsize=4, data=0x7F0000009000, shape=(7,), strides=(4,))
SLOT = 11


def numba_block(order=("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides")):
    """The block as Numba marshals it (or in another field ``order``) and each argument's offset."""
    values, offsets = [], []
    for facts in (DST, SLOT, SRC):
        offsets.append(len(values))
        if isinstance(facts, int):
            values.append(facts)
            continue
        fields = {"meminfo": [0], "parent": [0], "nitems": [facts.nitems], "itemsize": [facts.itemsize]}
        fields.update(data=[facts.data], shape=list(facts.shape), strides=list(facts.strides))
        for name in order:
            values += fields[name]
    return values, offsets


def test_layout_names_each_parameter():
    names = [name for name, _ in parameter_layout(SIG, ["dst", "slot", "src"])]
    assert names[:11] == [
        "dst.meminfo",
        "dst.parent",
        "dst.nitems",
        "dst.itemsize",
        "dst.data",
        "dst.shape[0]",
        "dst.shape[1]",
        "dst.shape[2]",
        "dst.strides[0]",
        "dst.strides[1]",
        "dst.strides[2]",
    ]
    assert names[11] == "slot" and len(names) == 11 + 1 + 7
    assert [size for _, size in parameter_layout(SIG)] == [8] * 12 + [8] * 7


def test_numba_order_passes_the_check():
    values, offsets = numba_block()
    check_parameter_block(SIG, (DST, SLOT, SRC), values, offsets, [8] * 19)


@pytest.mark.parametrize(
    "order",
    [
        ("meminfo", "parent", "itemsize", "nitems", "data", "shape", "strides"),  # nitems / itemsize swapped
        ("meminfo", "parent", "nitems", "itemsize", "data", "strides", "shape"),  # strides before shape
        ("meminfo", "parent", "data", "nitems", "itemsize", "shape", "strides"),  # data first
        ("parent", "nitems", "itemsize", "data", "shape", "strides"),  # no meminfo field any more
        ("meminfo", "parent", "nitems", "itemsize", "data", "shape"),  # no strides
    ],
)
def test_another_marshalling_order_is_detected(order):
    values, offsets = numba_block(order)
    with pytest.raises(LaunchLayoutError):
        check_parameter_block(SIG, (DST, SLOT, SRC), values, offsets)


def test_wrong_ptx_parameter_list_is_detected():
    values, offsets = numba_block()
    with pytest.raises(LaunchLayoutError, match="PTX has 18 parameters"):
        check_parameter_block(SIG, (DST, SLOT, SRC), values, offsets, [8] * 18)
    with pytest.raises(LaunchLayoutError, match="sizes"):
        check_parameter_block(SIG, (DST, SLOT, SRC), values, offsets, [8] * 11 + [4] + [8] * 7)


def test_wrong_scalar_or_pointer_value_is_detected():
    values, offsets = numba_block()
    values[11] = SLOT + 1
    with pytest.raises(LaunchLayoutError, match=r"parameter 11 \(slot\) holds 12, expected 11"):
        check_parameter_block(SIG, (DST, SLOT, SRC), values, offsets, names=["dst", "slot", "src"])
    values, offsets = numba_block()
    values[4] += 8
    with pytest.raises(LaunchLayoutError, match=r"dst\.data"):
        check_parameter_block(SIG, (DST, SLOT, SRC), values, offsets, names=["dst", "slot", "src"])


def test_unsupported_argument_type_is_refused():
    with pytest.raises(LaunchLayoutError, match="arrays and integers only"):
        parameter_layout((types.float32,))


def test_make_launch_falls_back_and_warns_once(monkeypatch):
    from mamba_cache.core import kernels

    class Broken:
        def __init__(self, *args, **kwargs):
            raise LaunchLayoutError("parameter 2 (dst.nitems) holds 8, expected 30")

    monkeypatch.setattr(launch, "PreparedLaunch", Broken)
    monkeypatch.setattr(launch, "_WARNED", set())
    words = np.zeros((2, 3, 4), np.uint64)
    message = r"kernel copy_slot disabled with numba-cuda \S+ \(LaunchLayoutError"
    with pytest.warns(RuntimeWarning, match=message) as rec:
        first = launch.make_launch(kernels.copy_slot, (words, words, 0), 32)
        second = launch.make_launch(kernels.copy_slot, (words, words, 1), 32)
    assert isinstance(first, DispatcherLaunch) and isinstance(second, DispatcherLaunch)
    assert len(rec) == 1


@needs_gpu
def test_prepared_launches_pass_the_check_on_this_gpu():
    """With the installed numba-cuda every launch is prepared (a fallback would warn: an error here)."""
    cache = NumbaMambaCacheManager(small_config())
    cache.scatter_mtp_states(np.array([1, 2], np.int32))
    cache.scatter_accepted_tree_states(np.array([[0], [1]], np.int32), np.array([1, 1], np.int32))
    cache.clear_slot(1)
    cache.capture_conv_states(0)
    kinds = {type(entry[0]).__name__ for entry in cache._launches.values()}
    assert kinds == {"PreparedLaunch"}, kinds


@needs_gpu
def test_forced_fallback_matches_the_reference(monkeypatch, rng):
    def mismatch(*args, **kwargs):
        raise LaunchLayoutError("forced by the test")

    monkeypatch.setattr(launch, "check_parameter_block", mismatch)
    monkeypatch.setattr(launch, "_WARNED", set())
    config = small_config(max_batch_size=6, recurrent_state_size=400)  # 1200-word slots: two chunks
    with pytest.warns(RuntimeWarning, match="using the slower dispatcher launch"):
        ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
        for manager in (ref, dev):
            manager.reshape_intermediate_states(5, 3)
        fill_random([ref, dev], rng)
        accept = np.array([1, 3, 0, 2, 4], np.int32)
        indices = np.array([4, 0, 2, -1, 1], np.int32)
        ref.scatter_mtp_states(accept, state_indices=indices)
        dev.scatter_mtp_states(accept, state_indices=indices)
        assert_same_bits(snapshot(ref), snapshot(dev), "fallback scatter")
        fill_random([ref, dev], rng)
        nodes = np.array([[0, 2], [1, -1], [2, 0], [-1, -1], [0, 1]], np.int32)
        tree_accept = np.array([2, 1, 2, 2, 1], np.int32)
        ref.scatter_accepted_tree_states(nodes, tree_accept, indices)
        dev.scatter_accepted_tree_states(nodes, tree_accept, indices)
        assert_same_bits(snapshot(ref), snapshot(dev), "fallback tree")
        ref.clear_slot(3)
        dev.clear_slot(3)
        assert_same_bits(snapshot(ref), snapshot(dev), "fallback clear_slot")
        for slot in (0, 5):
            for kind in ("recurrent", "conv"):
                want = getattr(ref, f"capture_{kind}_states")(slot)
                got = getattr(dev, f"capture_{kind}_states")(slot)
                for a, b in zip(want, got, strict=True):
                    assert a.tobytes() == to_host(b).tobytes(), (kind, slot)
    assert {type(entry[0]) for entry in dev._launches.values()} == {DispatcherLaunch}


def test_host_node_arrays_of_one_byte_size_but_other_widths(rng):
    """Two tree commits whose host node arrays stage into the same buffer with other shapes.

    [2, 3] then [3, 2] int32: the same 24 bytes at the same staging pointer, so a launch that
    keyed its patched arguments on the pointer alone would keep the first shape.
    """
    config = small_config(max_intermediate_seq_len=4)
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    commits = [
        (np.array([[0, 1, 2], [1, 2, 3]], np.int32), np.array([3, 2], np.int32)),
        (np.array([[3, -1], [0, 2], [1, 0]], np.int32), np.array([2, 2, 1], np.int32)),
    ]
    for nodes, accept in commits:
        for manager in (ref, dev):
            manager.reshape_intermediate_states(nodes.shape[0], 4)
        fill_random([ref, dev], rng)
        before = snapshot(ref)
        ref.scatter_accepted_tree_states(nodes, accept)
        dev.scatter_accepted_tree_states(nodes, accept)
        assert_same_bits(snapshot(ref), snapshot(dev), f"tree commit of {nodes.tolist()}")
        changed = [
            slot for slot in range(nodes.shape[0]) if (before["conv"][:, slot] != snapshot(ref)["conv"][:, slot]).any()
        ]
        assert changed == list(range(nodes.shape[0])), changed  # every row committed: the test is not vacuous
