"""8-bit pools on the Numba backend against the NumPy reference, bit for bit (simulator here, the GPU there)."""

import dataclasses

import numpy as np
import pytest
from helpers import BACKENDS, ON_GPU, SIMULATOR_LONG, assert_same_bits, device_int32, snapshot, to_host
from numba import cuda
from test_quant8_cache import fill, q8_config

from mamba_cache.precision import QUANT8_DTYPE_NAMES
from mamba_cache.precision.quant8 import SLOT_SCALE_POOLS
from mamba_cache.prefix import PrefixStateCache

#: Smaller than q8_config's default for the simulator: 1 layer, 4 slots, 3 groups of N = 5 (the 70 conv
#: channels stay: a full block of 64 and a short one).
SMALL = {"num_recurrent_layers": 1, "max_batch_size": 4, "recurrent_state_num_heads": 1}


def twin_managers(config, rng):
    """A NumPy and a Numba manager of ``config`` holding the same bits in every pool (scales and residuals too)."""
    reference = BACKENDS["numpy"](config)
    fill(reference, rng)
    device = BACKENDS["numba"](config)
    for name, pool in snapshot(reference).items():
        target = getattr(device._pools, name, None) if name in device._pools._fields else device._scales[name]
        target.copy_to_device(np.ascontiguousarray(pool).view(target.dtype))
    assert_same_bits(snapshot(device), snapshot(reference), "set-up")
    return reference, device


@pytest.mark.parametrize(
    ("dtype", "conv_dtype", "overrides"),
    [
        ("int8", "float8_e4m3fn", {"stochastic_rounding": True, "error_feedback": True}),
        pytest.param("float8_e5m2", "int8", {}, marks=SIMULATOR_LONG),
        pytest.param(
            "float8_e4m3fn",
            "bfloat16",
            {"intermediate_conv_state_dtype": None, "stochastic_rounding": True},
            marks=SIMULATOR_LONG,
        ),
        (
            "int8",
            "int8",
            {
                "intermediate_recurrent_state_dtype": None,
                "intermediate_conv_state_dtype": None,
                "verify_writes_main_pool": True,
            },
        ),
    ],
    ids=["int8-e4m3-stochastic-feedback", "e5m2-int8-nearest", "e4m3-bf16-conv", "plain-int8"],
)
def test_numba_8bit_scatter_and_tree_match_numpy(rng, dtype, conv_dtype, overrides):
    config = q8_config(dtype, conv_dtype, **SMALL, **overrides)
    reference, device = twin_managers(config, rng)
    accept = [3, 0, 2, 1]  # rows 0 and 2 commit; row 3 names slot 5, which does not exist
    slots = [2, 0, 1, 5]
    positions = rng.integers(0, 2**31 - 8, 4).tolist()
    entries = []
    for manager, backend in ((reference, "numpy"), (device, "numba")):
        store = PrefixStateCache(manager, entries=3, block_size=4)
        reserved = [store.reserve() for _ in range(3)]
        manager.scatter_mtp_states(  # rows 0 and 2 track steps 1 and 0; row 3's slot does not exist: no entry
            device_int32(backend, accept),
            state_indices=device_int32(backend, slots),
            positions=device_int32(backend, positions),
            store=store,
            track_entries=device_int32(backend, [reserved[0], reserved[2], reserved[1], reserved[2]]),
            track_steps=device_int32(backend, [1, 0, 0, 0]),
        )
        entries.append(entry_bytes(manager, store))
        store.close()
    assert_same_bits(snapshot(device), snapshot(reference), "scatter")
    assert_same_bits(entries[1], entries[0], "tracked entries")
    assert not any(pool[:, 2].any() for pool in entries[0].values())  # named only by rows that track nothing
    nodes = [[0, 2, -1], [1, -1, -1], [2, 0, 1], [0, 0, 0]]
    for manager, backend in ((reference, "numpy"), (device, "numba")):
        manager.scatter_accepted_tree_states(
            device_int32(backend, nodes),
            device_int32(backend, [3, 1, 3, 0]),
            positions=device_int32(backend, positions),
        )
    assert_same_bits(snapshot(device), snapshot(reference), "tree")


def test_numba_8bit_slots_move_with_scales(rng):
    config = q8_config("float8_e4m3fn", "int8", error_feedback=True)
    reference, device = twin_managers(config, rng)
    for manager, backend in ((reference, "numpy"), (device, "numba")):
        manager.copy_slots(device_int32(backend, [1, 3, 9]), device_int32(backend, [0, 4, 2]))
        manager.clear_slot(3)
    assert_same_bits(snapshot(device), snapshot(reference), "copy and clear")
    captured = {name: pool.copy_to_host() for name, pool in device.capture_scales(1).items()}
    assert all(captured[name].tobytes() == pool.tobytes() for name, pool in reference.capture_scales(1).items())
    states = (device.capture_recurrent_states(1), device.capture_conv_states(1), device.capture_scales(1))
    device.restore_slot(3, list(states[0]), list(states[1]), scales=states[2])
    reference.copy_slots(np.array([1], np.int32), np.array([3], np.int32))
    assert_same_bits(snapshot(device), snapshot(reference), "restore")


@pytest.mark.parametrize(
    ("conv_dtype", "feedback", "pools"),
    [("int8", True, 5), ("int8", False, 4), ("bfloat16", True, 4), ("bfloat16", False, 3)],
)
def test_numba_8bit_slot_moves_take_one_launch_with_their_scales(rng, monkeypatch, conv_dtype, feedback, pools):
    # The contract: scales (and the residual) move with their states in the same launch. Count the kernel
    # launches of a copy_slots, a clear_slot and a prefix insert + restore, and check their bits against NumPy.
    from mamba_cache.core import launch as launch_module
    from mamba_cache.prefix import PrefixStateCache

    config = dataclasses.replace(
        q8_config("float8_e4m3fn", conv_dtype, error_feedback=feedback),
        **({} if conv_dtype == "int8" else {"intermediate_conv_state_dtype": None}),
    )
    reference, device = twin_managers(config, rng)
    assert len(device._moving_pools()) == pools
    stores = [PrefixStateCache(manager, entries=2, block_size=4) for manager in (reference, device)]
    launches = []
    monkeypatch.setattr(
        launch_module.DispatcherLaunch,
        "launch",
        lambda self, grid, stream, _launch=launch_module.DispatcherLaunch.launch: (
            launches.append(self),
            _launch(self, grid, stream),
        ),
    )
    for manager, store, backend in ((reference, stores[0], "numpy"), (device, stores[1], "numba")):
        before = len(launches)
        manager.copy_slots(device_int32(backend, [1, 3]), device_int32(backend, [0, 4]))
        if backend == "numba":
            assert len(launches) - before == 1, "copy_slots"
        manager.clear_slot(3)
        if backend == "numba":
            assert len(launches) - before == 2, "clear_slot"
        store.insert(list(range(4)), 2)
        store.restore(store.match(list(range(5))), 3)
        if backend == "numba":
            assert len(launches) - before == 4, "prefix insert and restore"
    assert_same_bits(snapshot(device), snapshot(reference), "copy, clear, insert and restore")


@pytest.mark.parametrize("dtype", QUANT8_DTYPE_NAMES)
def test_numba_8bit_pools_are_raw_bytes_and_export_scales(dtype):
    device = BACKENDS["numba"](q8_config(dtype))
    assert device.pools.recurrent.dtype.itemsize == 1 and device.get_recurrent_scales(1).shape == (5, 2, 3)
    assert device.get_conv_scales(0).shape == (5, 2, 3) and device.get_conv_scales(0).dtype == np.float32


@pytest.mark.parametrize(("dtype", "code"), [("float8_e4m3fn", 10), ("float8_e5m2", 12), ("int8", 0)])
def test_8bit_pools_export_dlpack_with_their_type_code(dtype, code):
    """Numba pools hold float8 as uint8 raw bits; their views export the DLPack float8 code (int8: kDLInt)."""
    from test_dlpack import call_deleter, read_capsule

    device = BACKENDS["numba"](q8_config(dtype))
    capsule = device.get_recurrent_state(1).__dlpack__()
    assert read_capsule(capsule)["dtype"] == (code, 8, 1)
    call_deleter(capsule)
    torch = pytest.importorskip("torch")
    host = BACKENDS["numpy"](q8_config(dtype))
    view = host.get_recurrent_state(0)
    view[...] = (np.arange(view.size).reshape(view.shape) % 9 - 4).astype(view.dtype)
    tensor = torch.from_dlpack(view)
    assert str(tensor.dtype) == f"torch.{dtype}"
    assert (tensor.float().numpy() == view.astype(np.float32)).all()
    tensor[0, 0, 0, 0] = 3  # zero copy: the cache sees the write
    assert view[0, 0, 0, 0] == 3


def test_8bit_snapshot_crosses_backends(rng, tmp_path):
    config = q8_config("float8_e4m3fn", "float8_e5m2", error_feedback=True)
    reference, device = twin_managers(config, rng)
    device.save_slot(tmp_path / "slot.npz", 1)
    reference.load_slot(tmp_path / "slot.npz", 3)
    device.copy_slots(device_int32("numba", [1]), device_int32("numba", [3]))
    assert_same_bits(snapshot(device), snapshot(reference), "snapshot")


def test_numba_prefix_store_moves_8bit_entries_with_scales(rng):
    config = q8_config("float8_e4m3fn", "int8", error_feedback=True)
    reference, device = twin_managers(config, rng)
    for manager in (reference, device):
        store = PrefixStateCache(manager, entries=1, block_size=4, host_entries=1)
        store.insert(list(range(4)), 2)
        store.insert(list(range(50, 54)), 0)  # the first entry moves to the host tier
        store.restore(store.match(list(range(5))), 4)
        store.restore(store.match(list(range(50, 55))), 1)
    assert_same_bits(snapshot(device), snapshot(reference), "prefix store")


#: Gated DeltaNet on the simulator: two value heads of two key heads (k of head i is k[i]).
GDN = {"mixer": "gdn", "recurrent_state_num_heads": 2, "n_groups": 2}


@pytest.mark.parametrize(
    ("dtype", "conv_dtype", "overrides"),
    [
        ("int8", "float8_e4m3fn", {"stochastic_rounding": True, "error_feedback": True}),
        pytest.param("float8_e5m2", "bfloat16", {}, marks=SIMULATOR_LONG),
        ("float8_e4m3fn", "float8_e5m2", {**GDN, "stochastic_rounding": True, "error_feedback": True}),
        pytest.param("int8", "float16", {**GDN, "recurrent_state_head_dim": 5}, marks=SIMULATOR_LONG),
        pytest.param("float8_e5m2", "int8", {**GDN, "stochastic_rounding": True}, marks=SIMULATOR_LONG),
    ],
    ids=["int8-e4m3-stochastic-feedback", "e5m2-bf16", "gdn-e4m3-e5m2-stochastic-feedback", "gdn-int8-fp16",
         "gdn-e5m2-int8-stochastic"],
)  # fmt: skip
def test_numba_8bit_replay_matches_numpy(rng, dtype, conv_dtype, overrides):
    config = q8_config(
        dtype,
        conv_dtype,
        commit_mode="replay",
        intermediate_recurrent_state_dtype=None,
        intermediate_conv_state_dtype=None,
        **{**SMALL, **overrides},
    )
    reference, device = twin_managers(config, rng)
    fill_steps(rng, reference, device)
    accept, slots = [3, 0, 2, 9], [2, 0, 1, 3]  # row 3 accepts more than V: untouched
    positions = rng.integers(0, 2**20, 4).tolist()
    nodes = [[0, 2, 1], [1, -1, 0], [2, 2, 2], [1, 0, 2]]
    entries = []
    for manager, backend in ((reference, "numpy"), (device, "numba")):
        store = PrefixStateCache(manager, entries=3, block_size=4)
        reserved = [store.reserve() for _ in range(3)]
        manager.replay_mtp_states(  # rows 0 and 2 track steps 1 and 0 (rows 1 and 3 commit nothing)
            device_int32(backend, accept),
            state_indices=device_int32(backend, slots),
            positions=device_int32(backend, positions),
            store=store,
            track_entries=device_int32(backend, [reserved[0], reserved[2], reserved[1], reserved[2]]),
            track_steps=device_int32(backend, [1, 0, 0, 0]),
        )
        entries.append(entry_bytes(manager, store))
        manager.replay_accepted_tree_states(  # a tree commit over the same stash: rows 0, 2, 3, 4 replay a path
            device_int32(backend, nodes),
            device_int32(backend, [3, 2, 1, 3]),
            positions=device_int32(backend, positions),
        )
    assert_8bit_close(snapshot(device), snapshot(reference), dtype, "replay")
    assert_8bit_close(entries[1], entries[0], dtype, "tracked entries")


def entry_bytes(manager, store):
    """A prefix store's entry pools by pool name (``_moving_pools`` order), as `snapshot` shows pools."""
    names = ["recurrent", "conv", *(n for n in SLOT_SCALE_POOLS if n in manager.scale_pools)]
    return as_bytes(dict(zip(names, map(to_host, store.entry_pools), strict=True)))


def fill_steps(rng, reference, device, name="_stash"):
    """The same random replay stash (or history ring: ``name="_history"``) in both managers."""
    for field, pool in getattr(reference, name).items():
        if field == "conv":
            bits = np.dtype(f"u{pool.dtype.itemsize}")  # moved, never computed: any bit pattern
            values = rng.integers(0, 2 ** (8 * bits.itemsize), pool.shape, dtype=bits).view(pool.dtype)
        else:
            values = rng.uniform(0.25, 1.0, pool.shape).astype(pool.dtype)
        pool[...] = values
        target = getattr(device, name)[field]
        target.copy_to_device(np.ascontiguousarray(values).view(target.dtype))


def assert_8bit_close(got, want, dtype, context):
    """Numba vs NumPy 8-bit pools: the same bits on the simulator; on a GPU the recurrent state within one step."""
    if ON_GPU:  # conv moves and untouched slots are exact; the recurrent state within one step
        from mamba_cache.precision import quant8

        stored = want["recurrent"].view(quant8._DTYPES[dtype])
        assert quant8.within_one_step(got["recurrent"], got["scales_recurrent"], stored, want["scales_recurrent"])
        got = {k: v for k, v in got.items() if k not in ("recurrent", "scales_recurrent", "residual_recurrent")}
        want = {k: v for k, v in want.items() if k in got}
    assert_same_bits(got, want, context)


@pytest.mark.parametrize(
    ("dtype", "conv_dtype", "overrides"),
    [
        ("int8", "float8_e4m3fn", {"stochastic_rounding": True, "error_feedback": True}),
        pytest.param("float8_e4m3fn", "bfloat16", {}, marks=SIMULATOR_LONG),
        pytest.param("float8_e5m2", "int8", {**GDN, "stochastic_rounding": True}, marks=SIMULATOR_LONG),
        pytest.param("int8", "float8_e5m2", {**GDN, "error_feedback": True}, marks=SIMULATOR_LONG),
    ],
    ids=["int8-e4m3-stochastic-feedback", "e4m3-bf16", "gdn-e5m2-int8-stochastic", "gdn-int8-e5m2-feedback"],
)
def test_numba_8bit_checkpoint_mode_matches_numpy(rng, dtype, conv_dtype, overrides):
    """Folds, tracking, reads (current_state, capture_*, copy_slots, the prefix store) and materialize, as NumPy."""
    config = q8_config(
        dtype,
        conv_dtype,
        commit_mode="checkpoint",
        history_len=4,
        intermediate_recurrent_state_dtype=None,
        intermediate_conv_state_dtype=None,
        **{**SMALL, **overrides},
    )
    reference, device = twin_managers(config, rng)
    fill_steps(rng, reference, device, "_history")
    positions = rng.integers(0, 2**20, 4).astype(np.int64)
    tracked = []
    for manager, backend in ((reference, "numpy"), (device, "numba")):
        manager.set_positions(np.arange(4, dtype=np.int32), positions)
        store = PrefixStateCache(manager, entries=2, block_size=4)
        reserved = [store.reserve() for _ in range(2)]
        # S = 3, R = 4: slot 2 takes one step (h = 1), slot 1 two (h' = 2 folds); row 3 (a > V) is untouched;
        # rows 0 and 2 track their steps 0 and 1 (ring steps 0 and 1 from the checkpoints before the commit)
        manager.checkpoint_mtp_states(
            device_int32(backend, [1, 0, 2, 9]),
            state_indices=device_int32(backend, [2, 0, 1, 3]),
            store=store,
            track_entries=device_int32(backend, [reserved[0], reserved[1], reserved[1], reserved[0]]),
            track_steps=device_int32(backend, [0, 0, 1, 0]),
        )
        tracked.append(entry_bytes(manager, store))
        store.close()
    assert device.history_lengths().tolist() == reference.history_lengths().tolist() == [0, 0, 1, 0]
    assert device.checkpoint_positions().tolist() == reference.checkpoint_positions().tolist()
    assert_8bit_close(snapshot(device), snapshot(reference), dtype, "fold")
    assert_8bit_close(tracked[1], tracked[0], dtype, "tracked entries")
    current = []
    for manager in (reference, device):  # slot 2's folded state (h = 1) and its scales
        recurrent, conv = manager.current_state(2)
        state = {"recurrent": np.stack([to_host(a) for a in recurrent]), "conv": np.stack([to_host(a) for a in conv])}
        current.append(as_bytes(state | {name: to_host(pool) for name, pool in manager.capture_scales(2).items()}))
    assert current[1]["recurrent"].tobytes() != snapshot(device)["recurrent"][:, 2].tobytes()  # the ring matters
    assert_8bit_close(current[1], current[0], dtype, "current_state")
    kept = len(device._launches)
    device.current_state(2)  # new output arrays each call: nothing more is kept for them
    assert len(device._launches) == kept
    outs = tuple(cuda.device_array_like(pool[:, :1]) for pool in (device.pools.recurrent, device.pools.conv))
    device.capture_states(2, out=outs)  # into the caller's outputs (the scales beside them in a kept scratch)
    assert [to_host(out).tobytes() for out in outs] == [current[1][kind].tobytes() for kind in ("recurrent", "conv")]
    entries = []
    for manager, backend in ((reference, "numpy"), (device, "numba")):
        manager.copy_slots(device_int32(backend, [2]), device_int32(backend, [0]))  # slot 0 gets the folded state
        store = PrefixStateCache(manager, entries=1, block_size=4)
        store.insert(list(range(4)), 2)  # the folded state of slot 2 into the entry, scales and residuals too
        entries.append(entry_bytes(manager, store))
        manager.materialize(device_int32(backend, [2, -1]))
    assert device.history_lengths().tolist() == reference.history_lengths().tolist() == [0, 0, 0, 0]
    assert_8bit_close(snapshot(device), snapshot(reference), dtype, "copy_slots and materialize")
    assert_8bit_close(entries[1], entries[0], dtype, "prefix store entry")


def as_bytes(arrays):
    """8-bit values (ml_dtypes or raw) as uint8, scales and residuals as they are: how `snapshot` shows pools."""
    return {name: a.view(np.uint8) if a.dtype.itemsize == 1 else a for name, a in arrays.items()}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            dict(commit_mode="checkpoint", history_len=3, recurrent_state_dtype="float16", conv_state_dtype="int8"),
            "commit_mode='checkpoint'",
        ),
        (dict(commit_mode="replay", recurrent_state_dtype="bfloat16", conv_state_dtype="int8"), "commit_mode='replay'"),
    ],
    ids=["checkpoint-8bit-conv-only", "replay-8bit-conv-only"],
)
def test_numba_refuses_the_8bit_modes_it_does_not_build(overrides, words):
    """A clear ConfigError naming the mode, before any pool exists (the NumPy reference builds both).

    (The Gated DeltaNet replay commit and checkpoint mode with an 8-bit recurrent state, refused here
    before, are built: ``test_numba_8bit_replay_matches_numpy`` and
    ``test_numba_8bit_checkpoint_mode_matches_numpy`` compare them with the NumPy reference.)
    """
    from mamba_cache import ConfigError, NumbaMambaCacheManager, NumpyMambaCacheManager
    from mamba_cache.presets import PRESETS

    config = PRESETS["qwen3-next-80b-a3b" if overrides.get("mixer") == "gdn" else "nemotron-h-8b"].config(
        batch=2, mtp=3
    )
    fields = {"recurrent_state_dtype": "int8", **overrides}
    config = dataclasses.replace(config, num_recurrent_layers=1, intermediate_recurrent_state_dtype=None, **fields)
    NumpyMambaCacheManager(config)
    with pytest.raises(ConfigError, match=words):
        NumbaMambaCacheManager(config)


def test_8bit_offload_and_resume_move_the_scales_and_parcels_are_refused(rng):
    # Preemption parks a slot's 8-bit values with their scales and residual and resumes them bit for bit,
    # on both backends; a parcel has no place for scales, so export / import refuse an 8-bit cache (and
    # checkpoint mode's offload, whose folded scales are not parked) before anything changes.
    config = q8_config("float8_e4m3fn", "int8", error_feedback=True)
    reference, device = twin_managers(config, rng)
    for manager in (reference, device):
        before = snapshot(manager)
        handles = manager.offload_slots(np.array([1, -1, 3], np.int32))
        manager.clear_slot(1)
        manager.clear_slot(3)
        manager.resume(handles[2], 1)
        manager.resume(handles[0], 3)
        after = snapshot(manager)
        slot_pools = [n for n in before if n in ("recurrent", "conv") or n.startswith(("scales_", "residual_"))]
        assert len(slot_pools) == 5  # states, both scale pools, the residual
        for name in slot_pools:  # slots 1 and 3 swapped in every slot pool, the others unchanged
            assert after[name][:, 1].tobytes() == before[name][:, 3].tobytes(), name
            assert after[name][:, 3].tobytes() == before[name][:, 1].tobytes(), name
            assert np.delete(after[name], [1, 3], 1).tobytes() == np.delete(before[name], [1, 3], 1).tobytes(), name
        with pytest.raises(ValueError, match="export_slots: not built for 8-bit states .*scales.*nothing changed"):
            manager.export_slots(np.array([0], np.int32))
        assert_same_bits(snapshot(manager), after, "refused export")
    assert_same_bits(snapshot(device), snapshot(reference), "offload and resume")
    checkpoint = BACKENDS["numpy"](dataclasses.replace(config, commit_mode="checkpoint", history_len=3))
    with pytest.raises(ValueError, match="offload_slots: not built for 8-bit states .*checkpoint mode"):
        checkpoint.offload_slots(np.array([0], np.int32))
