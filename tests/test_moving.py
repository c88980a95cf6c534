"""State parcels (export / import across TP sizes) and preemption (offload / resume), in one process.

The expected shards are cut by hand from one unsharded state (heads for the recurrent state;
x | B | C or q | k | v sections for the conv state), independently of the library's layout code.
Every refusal is checked to leave every buffer bit-identical. The real-process proofs (gloo) are
in ``test_moving_processes.py``.
"""

import dataclasses
import zlib

import numpy as np
import pytest
from helpers import BACKENDS, ON_GPU, SEED, SIMULATOR_LONG, assert_same_bits, snapshot, to_host, write_pool

from mamba_cache import Config, NumpyMambaCacheManager, pad_slot_id
from mamba_cache.moving import ParcelError, StateParcel, adler32_chunks
from mamba_cache.moving.parcel import ParcelDescriptor


def model(mixer="mamba2", groups=2, dtype="float32", conv_dtype="float16", layers=2, batch=4) -> Config:
    """An unsharded config whose conv channels follow the mixer's layout (H = 4, D = 2, N = 3, K = 3)."""
    heads, dim, size = 4, 2, 3
    conv = heads * dim + 2 * groups * size if mixer == "mamba2" else 2 * groups * dim + heads * size
    return Config(
        num_recurrent_layers=layers, max_batch_size=batch, recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim, recurrent_state_size=size, conv_dim=conv, conv_kernel=3,
        max_intermediate_seq_len=2, recurrent_state_dtype=dtype, conv_state_dtype=conv_dtype,
        mixer=mixer, n_groups=groups,
    )  # fmt: skip


def shard_config(config: Config, tp: int, rank: int) -> Config:
    keys = config.n_groups * (
        config.recurrent_state_size if config.mixer == "mamba2" else config.recurrent_state_head_dim
    )
    return config.shard(tp, replicated_conv_channels=0 if config.n_groups % tp == 0 else 2 * keys, rank=rank)


def cut(config: Config, recurrent: np.ndarray, conv: np.ndarray, tp: int, rank: int) -> tuple:
    """Rank ``rank`` of ``tp``'s part of unsharded ``[L, B, ...]`` states, cut by hand."""
    heads, dim, size, groups = (config.recurrent_state_num_heads, config.recurrent_state_head_dim,
                                config.recurrent_state_size, config.n_groups)  # fmt: skip
    share = heads // tp
    rec = recurrent[:, :, rank * share : (rank + 1) * share]
    if config.mixer == "mamba2":
        sections = [(heads * dim, True), (groups * size, False), (groups * size, False)]
    else:
        sections = [(groups * dim, False), (groups * dim, False), (heads * size, True)]
    pieces, offset = [], 0
    for channels, by_heads in sections:
        if by_heads or groups % tp == 0:
            step = channels // tp
            pieces.append(conv[:, :, offset + rank * step : offset + (rank + 1) * step])
        else:  # one group: whole on every rank
            pieces.append(conv[:, :, offset : offset + channels])
        offset += channels
    return np.ascontiguousarray(rec), np.ascontiguousarray(np.concatenate(pieces, axis=2))


def random_states(config: Config, rng) -> tuple:
    rec = rng.standard_normal((config.num_recurrent_layers, *config.recurrent_state_shape))
    conv = rng.standard_normal((config.num_recurrent_layers, *config.conv_state_shape))
    return rec.astype(config.recurrent_state_dtype), conv.astype(config.conv_state_dtype)


def ranks(backend, config, tp, rng=None, states=None) -> list:
    """The ``tp`` managers of a TP group; with ``states``, each holding its cut of them."""
    managers = [BACKENDS[backend](shard_config(config, tp, r)) for r in range(tp)]
    for r, manager in enumerate(managers):
        if states is not None:
            rec, conv = cut(config, *states, tp, r)
            write_pool(manager, "recurrent", rec)
            write_pool(manager, "conv", conv)
        else:  # random bits everywhere: what an import must leave alone is random, not zero
            write_pool(manager, "recurrent", random_states(manager.get_config(), rng)[0])
            write_pool(manager, "conv", random_states(manager.get_config(), rng)[1])
    return managers


def move(sources, dests, src_slots, dst_slots, namespace="") -> list:
    """Export from every source rank, import every piece on every destination rank; the parcels."""
    parcels = [
        s.export_slots(np.array(src_slots, np.int32), namespace=namespace, dest_tp_size=len(dests)) for s in sources
    ]
    for d in dests:
        for parcel in parcels:
            if any(desc.dest_rank == d.get_config().tp_rank for desc, _ in parcel.pieces):
                d.import_slots(parcel, np.array(dst_slots, np.int32), namespace=namespace)
    return parcels


def host_bytes(buffer) -> bytes:
    return to_host(buffer).tobytes()


# ---------------------------------------------------------------- checksums
def test_adler32_twin_is_zlib_and_catches_every_flipped_byte(rng):
    data = rng.integers(0, 256, 3 * 1000 + 17, dtype=np.uint8)
    sums = adler32_chunks(data, 1000)
    assert sums.tolist() == [zlib.adler32(data[i : i + 1000].tobytes()) for i in range(0, data.size, 1000)]
    for i in range(0, data.size, 7):  # one flipped bit per byte position (every 7th: fast)
        flipped = data.copy()
        flipped[i] ^= np.uint8(1 << int(rng.integers(0, 8)))
        assert (adler32_chunks(flipped, 1000) != sums).sum() == 1, i


def test_device_checksums_equal_the_twin():
    manager = BACKENDS["numba"](model())
    data = np.random.default_rng(SEED).integers(0, 256, 2 * 2048 + 1001, dtype=np.uint8)
    stream = manager._stream(None)
    device = manager._parcel_buffer_in("buffer", data, data.size, stream)
    assert manager._chunk_checksums(device, 2048, stream).tolist() == adler32_chunks(data, 2048).tolist()
    # 512-byte splits (4 blocks a chunk, combined), and chunks that start off an 8-byte boundary (bytes only)
    assert manager._chunk_checksums(device, 2048, stream, 512).tolist() == adler32_chunks(data, 2048).tolist()
    assert manager._chunk_checksums(device, 1001, stream).tolist() == adler32_chunks(data, 1001).tolist()


# ---------------------------------------------------------------- resharding
CASES = [  # (mixer, groups, source TP, destination TP)
    ("mamba2", 2, 1, 2),
    ("mamba2", 2, 2, 1),
    ("mamba2", 1, 2, 4),
    ("gdn", 2, 1, 2),
    ("gdn", 1, 2, 1),
    ("gdn", 2, 2, 2),
]


@pytest.mark.parametrize("mixer, groups, ts, td", CASES)
def test_moving_reshards_exactly_and_round_trips(rng, backend, mixer, groups, ts, td):
    if backend == "numba" and (mixer, ts, td) not in (("mamba2", 1, 2), ("gdn", 2, 1)):
        pytest.skip("the simulator runs two of the cases (each kernel thread is Python); NumPy runs them all")
    config = model(mixer, groups, dtype="bfloat16" if mixer == "gdn" else "float32")
    states = random_states(config, rng)
    sources = ranks(backend, config, ts, states=states)
    dests = ranks(backend, config, td, rng=rng)
    before = [snapshot(d) for d in dests]
    src_slots, dst_slots = [2, 0, pad_slot_id], [1, pad_slot_id, 3]
    source_before = [snapshot(s) for s in sources]
    parcels = move(sources, dests, src_slots, dst_slots)
    for s, snap in zip(sources, source_before, strict=True):
        assert_same_bits(snapshot(s), snap, "export changes no slot")
    for r, d in enumerate(dests):
        rec, conv = cut(config, *states, td, r)
        got = snapshot(d)
        assert got["recurrent"][:, 1].tobytes() == rec[:, 2].tobytes()
        assert got["conv"][:, 1].tobytes() == conv[:, 2].tobytes()
        for slot in (0, 2, 3):  # row 1 of the parcel was padding at the destination; 0, 2 never named
            for kind in ("recurrent", "conv"):
                assert got[kind][:, slot].tobytes() == before[r][kind][:, slot].tobytes(), (r, slot, kind)
    # and back: the source ranks' state of the live row, bit for bit
    again = [d.export_slots(np.array(dst_slots, np.int32), dest_tp_size=ts) for d in dests]
    back = ranks(backend, config, ts, rng=rng)
    for b in back:
        for parcel in again:
            if any(desc.dest_rank == b.get_config().tp_rank for desc, _ in parcel.pieces):
                b.import_slots(parcel, np.array(src_slots, np.int32))
    for b, s in zip(back, sources, strict=True):
        for kind in ("recurrent", "conv"):
            assert snapshot(b)[kind][:, 2].tobytes() == snapshot(s)[kind][:, 2].tobytes()
    assert all(len(p.pieces) == (td // ts if td > ts else 1) for p in parcels)


def test_round_trip_bytes_are_identical(backend, rng):
    """export -> import -> export, every row live: the second parcel is the first, byte for byte."""
    config = model("mamba2", 2)
    states = random_states(config, rng)
    (source,) = ranks(backend, config, 1, states=states)
    dests = ranks(backend, config, 2, rng=rng)
    (first,) = [source.export_slots(np.array([3, 1], np.int32), dest_tp_size=2)]
    for d in dests:
        d.import_slots(first, np.array([0, 2], np.int32))
    (back,) = ranks(backend, config, 1, rng=rng)
    for d in dests:
        back.import_slots(d.export_slots(np.array([0, 2], np.int32), dest_tp_size=1), np.array([3, 1], np.int32))
    second = back.export_slots(np.array([3, 1], np.int32), dest_tp_size=2)
    assert [d for d, _ in first.pieces] == [d for d, _ in second.pieces]
    assert [host_bytes(b) for _, b in first.pieces] == [host_bytes(b) for _, b in second.pieces]


def test_checkpoint_mode_exports_the_folded_state_and_leaves_the_source(rng):
    from helpers import replay_config, stash_values

    config = replay_config(max_batch_size=3, commit_mode="checkpoint", history_len=4, max_intermediate_seq_len=2)
    manager = NumpyMambaCacheManager(config)
    rec, conv = random_states(config, rng)
    write_pool(manager, "recurrent", rec)
    write_pool(manager, "conv", conv)
    values = stash_values(config, rng, (config.max_batch_size, config.history_len))
    for layer in range(config.num_recurrent_layers):
        for name, ring in manager.get_history(layer).items():
            ring[...] = values[name][layer]
    manager.set_positions(np.arange(3, dtype=np.int32), np.array([5, 9, 0]))
    manager._history_lengths[...] = [2, 1, 0]
    before = snapshot(manager), manager.history_lengths(), {k: v.copy() for k, v in manager._history.items()}
    parcel = manager.export_slots(np.array([0, 1], np.int32), keys=[b"k" * 16, None])
    (descriptor, _) = parcel.pieces[0]
    assert descriptor.positions == (7, 10) and descriptor.keys == ((b"k" * 16).hex(), None)
    assert_same_bits(snapshot(manager), before[0], "export folds into the parcel only")
    assert (manager.history_lengths() == before[1]).all()
    target = NumpyMambaCacheManager(config)
    target.import_slots(parcel, np.array([2, 0], np.int32))
    for src, dst in ((0, 2), (1, 0)):
        want = manager.current_state(src)
        assert np.stack([a[0] for a in want[0]]).tobytes() == target.pools.recurrent[:, dst].tobytes()
        assert np.stack([a[0] for a in want[1]]).tobytes() == target.pools.conv[:, dst].tobytes()
    assert target.checkpoint_positions()[[2, 0]].tolist() == [7, 10]
    assert target.history_lengths().tolist() == [0, 0, 0]


# ---------------------------------------------------------------- refusals
def damaged(parcel, **changes) -> StateParcel:
    (descriptor, buffer), *rest = parcel.pieces
    return StateParcel(((dataclasses.replace(descriptor, **changes), buffer), *rest))


def test_import_refuses_and_changes_nothing(backend, rng):
    config = model("mamba2", 2)
    (source,) = ranks(backend, config, 1, states=random_states(config, rng))
    (target,) = ranks(backend, config, 1, rng=rng)
    parcel = source.export_slots(np.array([1, 2], np.int32), namespace="model-a")
    (descriptor, buffer) = parcel.pieces[0]
    flipped = to_host(buffer).copy()
    flipped[int(rng.integers(0, flipped.size))] ^= np.uint8(0x10)
    other_model = NumpyMambaCacheManager(model("mamba2", 2, layers=3)).export_slots(np.array([0, 1], np.int32))
    other_dtype = NumpyMambaCacheManager(model("mamba2", 2, dtype="float16")).export_slots(np.array([0, 1], np.int32))
    cases = [
        (StateParcel(((descriptor, flipped),)), "model-a", ParcelError, "fails its checksum"),
        (other_model, "", ParcelError, "another model"),
        (other_dtype, "", ParcelError, "recurrent state dtype float16, this cache keeps float32"),
        (parcel, "model-b", ParcelError, "namespace 'model-a', this import names 'model-b'"),
        (damaged(parcel, digest="0" * 32), "model-a", ParcelError, "do not match their digest"),
        (damaged(parcel, source_size=2), "model-a", ParcelError, "not the overlap"),
        (damaged(parcel, dest_rank=1), "model-a", ParcelError, "no piece for destination rank 0"),
        (damaged(parcel, dest_size=2), "model-a", ParcelError, "TP size 2"),
        (damaged(parcel, version=2), "model-a", ParcelError, "version 2"),
        (StateParcel(((descriptor, flipped[:-1]),)), "model-a", ParcelError, "holds"),
        ("parcel", "model-a", TypeError, "parcel must be"),
    ]
    before = snapshot(target)
    for bad, namespace, error, message in cases:
        with pytest.raises(error, match=message):
            target.import_slots(bad, np.array([0, 3], np.int32), namespace=namespace)
        assert_same_bits(snapshot(target), before, message)
    for slots, error, message in [
        (np.array([0], np.int32), ValueError, "one slot per parcel slot"),
        (np.array([0, 0], np.int32), ValueError, "distinct"),
        (np.array([0, 4], np.int32), IndexError, r"in \[0, 4\) or pad_slot_id"),
        (np.array([0, 1], np.int64), TypeError, "int32"),
    ]:
        with pytest.raises(error, match=message):
            target.import_slots(parcel, slots, namespace="model-a")
        assert_same_bits(snapshot(target), before, message)
    # a destination TP size that cannot split two groups of heads is refused at export
    with pytest.raises(ParcelError, match="cannot hold the model's B"):
        source.export_slots(np.array([0], np.int32), dest_tp_size=4)


def test_fingerprint_names_the_model_fields_only():
    """Each model field changes the fingerprint; B, S, the commit mode, the history length and the shard do not."""
    from mamba_cache.moving import fingerprint

    base = model()
    plain = dataclasses.replace(base, conv_dim=7)  # no conv sections: only the mixer field tells the mixers apart
    models = [
        base,
        model(layers=3),
        model(groups=1),
        model(dtype="float16"),
        model(conv_dtype="float32"),
        model("gdn"),
        plain,
        *(
            dataclasses.replace(plain, **change)
            for change in (
                {"mixer": "gdn"},
                {"conv_kernel": 4},
                {"recurrent_state_head_dim": 3},
                {"recurrent_state_size": 4},
                {"recurrent_state_num_heads": 8},
            )
        ),
    ]
    assert len({fingerprint(c) for c in models}) == len(models)
    same = [
        model(batch=7),
        dataclasses.replace(base, max_intermediate_seq_len=3),
        dataclasses.replace(base.in_commit_mode("checkpoint"), history_len=4),
        *(shard_config(base, 2, rank) for rank in range(2)),
    ]
    assert {fingerprint(c) for c in same} == {fingerprint(base)}


def test_shards_that_do_not_tile_the_heads_are_refused(rng):
    """A TP size that does not divide the heads: refused at export (destination) and at import (source)."""
    config = model("mamba2", 1)  # one group: B and C stay whole on every rank, only the heads decide
    (source,) = ranks("numpy", config, 1, states=random_states(config, rng))
    with pytest.raises(ParcelError, match="a destination of TP size 3 cannot hold the model's recurrent"):
        source.export_slots(np.array([0], np.int32), dest_tp_size=3)
    (target,) = ranks("numpy", config, 1, rng=rng)
    before = snapshot(target)
    parcel = damaged(source.export_slots(np.array([0, 1], np.int32)), source_size=3)
    with pytest.raises(ParcelError, match="a source of TP size 3 cannot hold the model's recurrent"):
        target.import_slots(parcel, np.array([2, 3], np.int32))
    assert_same_bits(snapshot(target), before, "a refused import")


def test_descriptor_round_trips_through_json(rng):
    (source,) = ranks("numpy", model(), 1, states=random_states(model(), rng))
    parcel = source.export_slots(np.array([0, 1], np.int32), positions=np.array([3, 4]), keys=[None, b"x" * 16])
    descriptor = parcel.pieces[0][0]
    assert ParcelDescriptor.from_json(descriptor.to_json()) == descriptor
    with pytest.raises(ParcelError, match="not a state parcel descriptor"):
        ParcelDescriptor.from_json(b"{}")


# ---------------------------------------------------------------- preemption
def test_offload_and_resume_are_bit_exact_and_single_use(backend, rng):
    config = model("gdn", 2, dtype="float16")
    (manager,) = ranks(backend, config, 1, states=random_states(config, rng))
    manager.reserve_offload(3)
    before = snapshot(manager)
    handles = manager.offload_slots(np.array([2, pad_slot_id, 0], np.int32))
    assert handles[1] is None
    assert_same_bits(snapshot(manager), before, "offload changes no slot")
    write_pool(manager, "recurrent", random_states(config, rng)[0])  # the slots are reused meanwhile
    write_pool(manager, "conv", random_states(config, rng)[1])
    middle = snapshot(manager)
    manager.resume(handles[0], 1)
    manager.resume(handles[2], 3)
    got = snapshot(manager)
    for kind in ("recurrent", "conv"):
        assert got[kind][:, 1].tobytes() == before[kind][:, 2].tobytes()
        assert got[kind][:, 3].tobytes() == before[kind][:, 0].tobytes()
        for slot in (0, 2):
            assert got[kind][:, slot].tobytes() == middle[kind][:, slot].tobytes()
    with pytest.raises(LookupError, match="single-use"):
        manager.resume(handles[0], 2)
    with pytest.raises(IndexError, match=r"slot must be in \[0, 4\), got -1"):
        manager.resume(manager.offload_slots(np.array([1], np.int32))[0], pad_slot_id)
    with pytest.raises(MemoryError, match="3 states to park but 2 of 3 host entries are free"):
        manager.offload_slots(np.array([0, 1, pad_slot_id, 2], np.int32))
    with pytest.raises(ValueError, match="are parked; resume them first"):
        manager.reserve_offload(8)
    assert_same_bits(snapshot(manager), got, "refusals")


def test_a_used_handle_never_resumes_the_entry_s_next_state(backend, rng):
    """A handle stays used after its host entry parks another state: resuming it refuses, changing nothing."""
    config = model("mamba2", 2)
    (manager,) = ranks(backend, config, 1, states=random_states(config, rng))
    manager.reserve_offload(1)  # one entry: the next offload refills the entry the used handle named
    (first,) = manager.offload_slots(np.array([0], np.int32))
    manager.resume(first, 1)
    (second,) = manager.offload_slots(np.array([2], np.int32))
    assert second.entry == first.entry
    before = snapshot(manager)
    with pytest.raises(LookupError, match="single-use"):
        manager.resume(first, 3)
    assert_same_bits(snapshot(manager), before, "a used handle")
    manager.resume(second, 3)
    for kind in ("recurrent", "conv"):
        assert snapshot(manager)[kind][:, 3].tobytes() == before[kind][:, 2].tobytes()


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
@pytest.mark.parametrize("mode", ["scatter", "replay", "checkpoint"])
def test_preempt_and_resume_mid_speculative_decoding_changes_nothing(rng, mode, mixer):
    """Random slots parked, their slots cleared, then resumed, between verify windows: the same bits and tokens."""
    from mamba_cache.models.gdn import TinyGatedDeltaNet
    from mamba_cache.models.mamba2 import TinyMamba2, matvec, rmsnorm

    config = dataclasses.replace(model(mixer, 2, conv_dtype="float32"), max_intermediate_seq_len=3)
    config = config.in_commit_mode(mode)
    if mode == "checkpoint":
        config = dataclasses.replace(config, history_len=5)
    tiny = (TinyMamba2 if mixer == "mamba2" else TinyGatedDeltaNet)(config, seed=int(rng.integers(1 << 30)))
    plain, preempted = NumpyMambaCacheManager(config), NumpyMambaCacheManager(config)
    prompt = rng.integers(0, tiny.vocab_size, (4, 3))
    for cache in (plain, preempted):
        tiny.prefill(cache, prompt)
    parked = 0
    for _ in range(4):
        drafts = rng.integers(0, tiny.vocab_size, (4, 3))
        accept = rng.integers(1, 4, 4).astype(np.int32)
        for cache in (plain, preempted):
            tiny.verify(cache, drafts)
            {"scatter": cache.scatter_mtp_states, "replay": cache.replay_mtp_states}.get(
                mode, cache.checkpoint_mtp_states
            )(accept)
        slots = rng.choice(4, size=2, replace=False).astype(np.int32)
        handles = preempted.offload_slots(slots)
        for slot in slots:
            preempted.clear_slot(int(slot))  # another request takes the slot meanwhile
        for handle, slot in zip(handles, slots, strict=True):
            preempted.resume(handle, int(slot))
        parked += len(handles)
    for slot in range(4):
        for a, b in zip(*(sum(c.current_state(slot), []) for c in (plain, preempted)), strict=True):
            assert a.tobytes() == b.tobytes(), (mode, slot)
    head = rng.standard_normal((tiny.weights["embedding"].shape[1], tiny.vocab_size)).astype(np.float32)
    tokens = [np.zeros(4, np.int64), np.zeros(4, np.int64)]
    emitted = [[], []]
    for _ in range(4):
        for i, cache in enumerate((plain, preempted)):
            u = tiny.decode_step(cache, tokens[i])
            tokens[i] = matvec(rmsnorm(u), head).argmax(axis=1)
            emitted[i].append(tokens[i])
    assert np.array_equal(emitted[0], emitted[1]) and parked == 8


def test_another_transport_recipe(rng):
    """The docs' recipe: a parcel is the descriptor's JSON and the buffer's bytes, whatever carries them."""
    from mamba_cache.moving import ParcelDescriptor

    config = model()
    (source,) = ranks("numpy", config, 1, states=random_states(config, rng))
    (cache,) = ranks("numpy", config, 1, rng=rng)
    parcel, slots, dest_rank = source.export_slots(np.array([1, 3], np.int32), namespace="my-model"), None, 0
    descriptor, buffer = parcel.piece(dest_rank)
    header, payload = descriptor.to_json(), bytes(buffer)  # two byte strings on the wire
    slots = np.array([0, 2], np.int32)
    received = StateParcel(((ParcelDescriptor.from_json(header), payload),))
    cache.import_slots(received, slots, namespace="my-model")
    assert snapshot(cache)["recurrent"][:, [0, 2]].tobytes() == snapshot(source)["recurrent"][:, [1, 3]].tobytes()


# ---------------------------------------------------------------- checkpoint mode on the Numba backend
@pytest.mark.parametrize(
    ("mixer", "dtype"), [("mamba2", "bfloat16"), pytest.param("gdn", "float16", marks=SIMULATOR_LONG)]
)
def test_numba_checkpoint_mode_moves_the_folded_state_and_leaves_the_source(rng, mixer, dtype):
    """Export / import / offload / resume in checkpoint mode on Numba, slots mid-ring, padding rows mixed in.

    The parcel carries each slot's folded state (after ``p0 + h`` tokens): NumPy's parcel for the
    same inputs (the same bytes on the simulator, the replay tolerance on a GPU). The source's
    checkpoints, ring, ``h`` and ``p0`` stay bit for bit; an import and a resume land the folded
    state as the slot's checkpoint with ``h = 0`` and ``p0`` the parcel's / handle's position.
    """
    from test_checkpoint import assert_close, current_dict, filled_rings

    config, (reference, numba, target) = filled_rings(rng, mixer, dtype, True, backends=("numpy", "numba", "numba"))
    # h = [0, 5, 0, 3, 0], p0 = [7, 100, 5, 0, 3]: slots 1 and 3 are mid-ring
    kinds = ("recurrent", "conv")

    def counters_and_ring(manager):
        rings = {name: to_host(value).tobytes() for name, value in manager._history.items()}
        return manager.history_lengths().tolist(), manager.checkpoint_positions().tolist(), rings

    def landed(manager, states, before, h, p0, rings):
        """``states`` (slot -> folded state) landed as checkpoints, these counters; the rest as ``before``."""
        got = snapshot(manager)
        for kind in kinds:
            for slot in range(config.max_batch_size):
                expected = states[slot][kind] if slot in states else before[kind][:, slot]
                assert got[kind][:, slot].tobytes() == expected.tobytes(), (kind, slot)
        assert counters_and_ring(manager) == (h, p0, rings)

    source = snapshot(numba), counters_and_ring(numba)
    want = {slot: current_dict(numba, slot) for slot in (1, 3)}
    for slot in (1, 3):
        assert_close(want[slot], current_dict(reference, slot), dtype, f"current_state({slot})")
        assert want[slot]["recurrent"].tobytes() != source[0]["recurrent"][:, slot].tobytes()  # the ring matters
    slots = np.array([3, pad_slot_id, 1, 4], np.int32)
    keys = [None, None, b"k" * 16, None]
    copies = []  # the pools each run copy reads: device arrays (a host array has no device address on a GPU)
    numba._copy_runs = lambda table, buffer, pools, *rest: (
        copies.append(pools) or type(numba)._copy_runs(numba, table, buffer, pools, *rest)
    )
    parcel = numba.export_slots(slots, keys=keys, namespace="m")
    assert copies and not any(isinstance(pool, np.ndarray) for pools in copies for pool in pools)
    assert_same_bits(snapshot(numba), source[0], "export folds into the parcel only")
    assert counters_and_ring(numba) == source[1], "export leaves h, p0 and the ring"
    ((descriptor, buffer),) = parcel.pieces
    ((oracle, oracle_buffer),) = reference.export_slots(slots, keys=keys, namespace="m").pieces
    assert descriptor.positions == oracle.positions == (3, None, 105, 3) and descriptor.pad_rows == (1,)
    if not ON_GPU:  # the simulator runs NumPy's float32 arithmetic: the same bytes
        assert descriptor == oracle and to_host(buffer).tobytes() == to_host(oracle_buffer).tobytes()
    else:
        checked = ("checksums", "digest")
        assert dataclasses.replace(descriptor, **{f: () for f in checked}) == dataclasses.replace(
            oracle, **{f: () for f in checked}
        )

    before = snapshot(target), counters_and_ring(target)
    target.import_slots(parcel, np.array([2, 0, 3, pad_slot_id], np.int32), namespace="m")
    # row 0 (slot 3, h = 3) -> 2; row 1 was padding (slot 0 untouched); row 2 (slot 1, h = 5) -> 3 (which had
    # h = 3); row 3 is padding here
    landed(target, {2: want[3], 3: want[1]}, before[0], [0, 5, 0, 0, 0], [7, 100, 3, 105, 3], before[1][2])
    assert current_dict(target, 3)["recurrent"].tobytes() == want[1]["recurrent"].tobytes()

    handles = numba.offload_slots(np.array([1, pad_slot_id, 3], np.int32))
    assert handles[1] is None and [handles[0].position, handles[2].position] == [105, 3]
    assert_same_bits(snapshot(numba), source[0], "offload folds into the host pool only")
    assert counters_and_ring(numba) == source[1], "offload leaves h, p0 and the ring"
    numba.resume(handles[0], 3)  # slot 3 had h = 3: now slot 1's folded state, h = 0, p0 = 105
    numba.resume(handles[2], 4)
    landed(numba, {3: want[1], 4: want[3]}, source[0], [0, 5, 0, 0, 0], [7, 100, 5, 105, 3], source[1][2])
    got = snapshot(numba)
    with pytest.raises(LookupError, match="single-use"):
        numba.resume(handles[0], 0)
    assert_same_bits(snapshot(numba), got, "a used handle changes nothing")
