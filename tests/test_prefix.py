"""Slot-to-slot copies and the prefix-state store, on both backends.

The store's host logic is shared; what each backend binds is the one-launch row copy (``copy_slots``,
restore, insert) and the commit fused with checkpoint tracking. Every test checks whole buffers
(untouched slots and entries bit-identical), on random non-zero bits.
"""

import hashlib

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    ON_GPU,
    assert_same_bits,
    device_int32,
    fill_random,
    fill_store,
    random_bits,
    small_config,
    snapshot,
    store_snapshot,
    to_host,
)

from mamba_cache import Config, ConfigError
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.prefix import PrefixHandle, PrefixStateCache, block_digests, root_digest


def state(snap, slot):
    """The bytes of one main-pool slot, both kinds."""
    return snap["recurrent"][:, slot].tobytes() + snap["conv"][:, slot].tobytes()


def entry(ssnap, e):
    return ssnap["entries_recurrent"][:, e].tobytes() + ssnap["entries_conv"][:, e].tobytes()


CONFIGS = {
    "f32-f16": small_config(),
    "f16-odd": small_config(recurrent_state_dtype="float16", recurrent_state_size=3, conv_dim=5, conv_kernel=1),
    "f64-big": small_config(
        recurrent_state_dtype="float64", conv_state_dtype="float32", recurrent_state_head_dim=33, conv_dim=129
    ),
}


# ---------------------------------------------------------------- copy_slots
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_copy_slots_copies_exactly_the_valid_pairs(backend, rng, name):
    config = CONFIGS[name]
    manager = BACKENDS[backend](config)
    fill_random([manager], rng)
    before = snapshot(manager)
    slots = rng.permutation(config.max_batch_size)
    src, dst = list(slots[:2]), list(slots[2:4])
    src += [config.max_batch_size, -1, int(slots[0])]  # padding pairs: either index out of range
    dst += [int(slots[4]), int(slots[4]), 2**31 - 1]
    manager.copy_slots(device_int32(backend, src), device_int32(backend, dst))
    expected = {k: v.copy() for k, v in before.items()}
    for s, d in zip(src[:2], dst[:2], strict=True):
        for kind in ("recurrent", "conv"):
            expected[kind][:, d] = before[kind][:, s]
    assert_same_bits(snapshot(manager), expected, f"copy_slots {src} -> {dst}")


def test_copy_slots_empty_and_no_layers(backend):
    manager = BACKENDS[backend](small_config())
    manager.copy_slots(device_int32(backend, []), device_int32(backend, []))
    empty = BACKENDS[backend](Config())
    empty.copy_slots(device_int32(backend, [0]), device_int32(backend, [1]))  # no layers: nothing to copy


def test_copy_slots_skips_negative_destinations(backend, rng):
    """A negative destination is padding (a GPU write there would land outside the pool): every pool unchanged."""
    manager = BACKENDS[backend](small_config())
    fill_random([manager], rng)
    before = snapshot(manager)
    manager.copy_slots(device_int32(backend, [0, 1]), device_int32(backend, [-1, -(2**31)]))
    assert_same_bits(snapshot(manager), before, "negative destinations")
    manager.copy_slots(device_int32(backend, [0, 1, 2]), device_int32(backend, [-1, 3, -2]))
    expected = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        expected[kind][:, 3] = before[kind][:, 1]
    assert_same_bits(snapshot(manager), expected, "the one valid pair among negative destinations")


@pytest.mark.parametrize(
    ("src", "dst", "msg"),
    [
        ([0, 1], [2, 2], "destinations must be distinct"),
        ([0, 1], [1, 3], "must not also be sources"),
        ([0], [0], "must not also be sources"),
    ],
)
def test_reference_refuses_conflicting_copies(rng, src, dst, msg):
    manager = BACKENDS["numpy"](small_config())
    fill_random([manager], rng)
    before = snapshot(manager)
    with pytest.raises(ValueError, match=msg):
        manager.copy_slots(np.array(src, np.int32), np.array(dst, np.int32))
    assert_same_bits(snapshot(manager), before)


# ---------------------------------------------------------------- keys
def test_key_chain_is_the_documented_blake2b_chain(rng):
    tokens = rng.integers(-(2**31), 2**31, size=23).astype(np.int64)
    bs, namespace = 5, "model-a/ädapter"
    digest = hashlib.blake2b(namespace.encode("utf-8"), digest_size=16).digest()
    assert root_digest(namespace) == digest
    want = []
    for i in range(1, 23 // bs + 1):
        block = b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens[(i - 1) * bs : i * bs])
        digest = hashlib.blake2b(digest + block, digest_size=16).digest()
        want.append(digest)
    assert block_digests(tokens, bs, namespace) == want
    assert block_digests(list(tokens), bs, namespace, blocks=2) == want[:2]
    assert block_digests(tokens, bs, "other")[0] != want[0]  # the namespace separates
    changed = tokens.copy()
    changed[0] += 1
    assert all(a != b for a, b in zip(block_digests(changed, bs, namespace), want, strict=True))  # a chain


def test_block_digests_never_names_blocks_past_the_tokens():
    """``blocks`` above the whole blocks present: their digests only, none for a partial or missing block."""
    tokens = np.arange(11)  # bs = 4: two whole blocks and three tokens of a third
    want = block_digests(tokens, 4, "ns")
    assert len(want) == 2
    for blocks in (2, 3, 10):
        assert block_digests(tokens, 4, "ns", blocks=blocks) == want, blocks
    assert block_digests(tokens, 4, "ns", blocks=1) == want[:1]
    assert block_digests(tokens, 4, "ns", blocks=0) == []
    assert block_digests(tokens[:3], 4, "ns", blocks=5) == []


# ---------------------------------------------------------------- store basics
def make(backend, rng, entries=4, block_size=4, config=None, **kwargs):
    manager = BACKENDS[backend](config or small_config(max_intermediate_seq_len=min(4, block_size)))
    fill_random([manager], rng)
    store = PrefixStateCache(manager, entries=entries, block_size=block_size, **kwargs)
    fill_store(store, rng)
    return manager, store


def test_insert_match_restore_moves_exactly_one_slot(backend, rng):
    manager, store = make(backend, rng)
    prompt = rng.integers(0, 1000, size=14)
    before, sbefore = snapshot(manager), store_snapshot(store)
    h8 = store.insert(prompt[:8], slot=2)
    assert h8 == PrefixHandle(0, 1, 8)
    after = store_snapshot(store)
    assert entry(after, 0) == state(before, 2)
    for e in range(1, 4):
        assert entry(after, e) == entry(sbefore, e)
    assert_same_bits(snapshot(manager), before, "insert changes no slot")
    # match: the longest cached prefix that leaves a token to run, and within max_tokens
    assert store.match(prompt) == h8
    assert store.match(prompt[:8]) is None  # would leave nothing to run
    assert store.match(prompt[:9]) == h8
    assert store.match(prompt, max_tokens=7) is None
    h4 = store.insert(prompt[:4], slot=0)
    assert store.match(prompt, max_tokens=7) == h4
    assert store.match(prompt) == h8
    other = prompt.copy()
    other[1] += 1
    assert store.match(other) is None  # same later blocks, other first block: no hit
    store.restore(h8, slot=4)
    got, want = snapshot(manager), {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        want[kind][:, 4] = before[kind][:, 2]
    assert_same_bits(got, want, "restore")
    assert store.stats.lookups == 7 and store.stats.hits == 4 and store.stats.hit_tokens == 8 * 3 + 4
    assert store.stats.inserts == 2 and "hit_rate" in str(store.stats)


def test_insert_of_a_present_prefix_copies_nothing(backend, rng):
    manager, store = make(backend, rng)
    prompt = rng.integers(0, 50, size=8)
    h = store.insert(prompt, slot=0)
    sbefore = store_snapshot(store)
    assert store.insert(prompt, slot=1) == h
    assert_same_bits(store_snapshot(store), sbefore)
    assert store.stats.inserts == 1


def test_lru_eviction_spares_pinned_and_refreshed_entries(backend, rng):
    manager, store = make(backend, rng, entries=3, block_size=2)
    prompts = [np.array([i, i]) for i in range(6)]
    handles = [store.insert(prompts[i], slot=i % 5) for i in range(3)]
    store.pin(handles[0])
    assert store.match(np.array([1, 1, 9])) == handles[1]  # refresh entry 1: entry 2 is now the LRU unpinned
    h3 = store.insert(prompts[3], slot=3)
    assert h3.entry == handles[2].entry and store.stats.evictions == 1
    with pytest.raises(LookupError, match="stale"):
        store.restore(handles[2], slot=0)
    store.pin(handles[1])
    store.pin(h3)
    snap = store_snapshot(store)
    assert store.insert(prompts[4], slot=4) is None  # every entry pinned: dropped, not an error
    assert store.stats.dropped_inserts == 1
    assert store.reserve() is None and store.stats.dropped_inserts == 2
    assert_same_bits(store_snapshot(store), snap, "a dropped insert writes nothing")
    store.unpin(h3)
    h4 = store.insert(prompts[4], slot=4)
    assert h4.entry == h3.entry
    for h in handles[:2]:
        store.restore(h, slot=0)  # the pinned ones are still valid
    with pytest.raises(ValueError, match="not pinned"):
        store.unpin(h4)


def test_batched_restore_and_insert(backend, rng):
    manager, store = make(backend, rng, entries=4, block_size=2)
    before = snapshot(manager)
    prefixes = [np.array([1, 2]), np.array([1, 2, 3, 4]), np.array([7, 7]), np.array([1, 2])]
    handles = store.insert_many(prefixes, np.array([3, 1, 0, 4], np.int32))
    assert [h.entry for h in handles] == [0, 1, 2, 0] and store.stats.inserts == 3
    snap = store_snapshot(store)
    for e, slot in ((0, 3), (1, 1), (2, 0)):
        assert entry(snap, e) == state(before, slot)
    store.restore_many([handles[1], handles[2], handles[1]], device_int32(backend, [4, 2, 9]))  # 9: padding
    want = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        want[kind][:, 4] = before[kind][:, 1]
        want[kind][:, 2] = before[kind][:, 0]
    assert_same_bits(snapshot(manager), want, "restore_many")


@pytest.mark.parametrize("slot_kind", ["device", "host"])
def test_restore_many_restages_only_a_changed_entry_list(backend, rng, slot_kind):
    """Repeated lists reuse the staged entries; a changed list, order or a reused entry never reads stale ones."""
    manager, store = make(backend, rng, entries=3, block_size=2)
    handles = store.insert_many([[1, 1], [2, 2], [3, 3]], np.array([0, 1, 2], np.int32))
    entries = store_snapshot(store)
    slots = device_int32(backend, [3, 4]) if slot_kind == "device" else np.array([3, 4], np.int32)
    for order in ([0, 1], [0, 1], [1, 0], [2, 2], [0, 1]):
        pair = [handles[i] for i in order]
        store.restore_many(pair, slots)
        got = snapshot(manager)
        assert state(got, 3) == entry(entries, pair[0].entry) and state(got, 4) == entry(entries, pair[1].entry), order
    store.pin(handles[1])
    new = store.insert([4, 4], slot=1)  # evicts [1, 1] (entry 0) and reuses it: same index, new contents
    assert new.entry == handles[0].entry
    with pytest.raises(LookupError, match="stale"):
        store.restore_many([handles[0], handles[1]], slots)
    store.restore_many([new, handles[1]], slots)
    got = snapshot(manager)
    assert state(got, 3) == entry(store_snapshot(store), new.entry) and state(got, 4) == entry(entries, 1)


def test_restore_many_skips_negative_slots(backend, rng):
    """A negative slot is padding (a GPU write there would land outside the pool): every pool unchanged."""
    manager, store = make(backend, rng, entries=2, block_size=2)
    handles = store.insert_many([[1, 1], [2, 2]], np.array([0, 1], np.int32))
    before, sbefore = snapshot(manager), store_snapshot(store)
    store.restore_many(handles, device_int32(backend, [-1, -(2**31)]))
    assert_same_bits(snapshot(manager), before, "negative slots")
    store.restore_many(handles, device_int32(backend, [-1, 3]))
    want = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        want[kind][:, 3] = before[kind][:, 1]
    assert_same_bits(snapshot(manager), want, "the one valid slot among negative ones")
    assert_same_bits(store_snapshot(store), sbefore, "a restore writes no entry")


def test_insert_many_never_writes_an_entry_twice(backend, rng):
    """More new prefixes than entries: the extra ones are dropped, not written over this batch's own."""
    manager, store = make(backend, rng, entries=2, block_size=1)
    before = snapshot(manager)
    handles = store.insert_many([[5], [6], [7]], np.array([0, 1, 2], np.int32))
    assert handles[2] is None and store.stats.dropped_inserts == 1
    snap = store_snapshot(store)
    assert entry(snap, handles[0].entry) == state(before, 0)
    assert entry(snap, handles[1].entry) == state(before, 1)


def test_insert_many_never_evicts_a_present_entry_it_returns(backend, rng):
    """A full store: the batch's present prefix is protected for the batch, so the new one is dropped."""
    manager, store = make(backend, rng, entries=1, block_size=2)
    before = snapshot(manager)
    a = store.insert([1, 1], slot=0)
    sbefore = store_snapshot(store)
    handles = store.insert_many([[1, 1], [2, 2]], np.array([3, 4], np.int32))
    assert handles == [a, None]
    assert store.stats.dropped_inserts == 1 and store.stats.evictions == 0 and store.stats.inserts == 1
    assert_same_bits(store_snapshot(store), sbefore, "a dropped insert writes nothing")
    assert store.match([1, 1, 0]) == a
    store.restore(a, slot=2)  # the returned handle is still valid
    assert state(snapshot(manager), 2) == state(before, 0)


def test_insert_many_never_drops_a_host_entry_it_returns(backend, rng):
    """A full host tier: a batch's prefix present there stays, so its handle is live when returned."""
    manager, store = make(backend, rng, entries=1, block_size=2, host_entries=1)
    before = snapshot(manager)
    store.insert([1, 1], slot=0)
    store.insert([2, 2], slot=1)  # [1, 1] -> the host tier, now full
    held = store.match([1, 1, 0])
    assert held.host
    # [3, 3] evicts [2, 2] from the device; its offload finds the one host entry held by this batch
    handles = store.insert_many([[1, 1], [3, 3]], np.array([2, 3], np.int32))
    assert handles[0] == held and handles[1] is not None and not handles[1].host
    assert store.match([2, 2, 0]) is None  # dropped (the host tier had no other entry), not [1, 1]
    store.restore(handles[0], slot=4)  # the returned host handle is still valid
    assert state(snapshot(manager), 4) == state(before, 0)
    store.insert([4, 4], slot=3)  # after the batch the host entry is unprotected again: [3, 3] replaces it
    with pytest.raises(LookupError, match="stale"):
        store.restore(held, slot=4)


def test_block_size_must_cover_a_verify_window(backend):
    manager = BACKENDS[backend](small_config(max_intermediate_seq_len=4))
    with pytest.raises(ConfigError, match=r"block_size must be >= max\(1, max_intermediate_seq_len\) = 4"):
        PrefixStateCache(manager, entries=2, block_size=3)
    PrefixStateCache(manager, entries=2, block_size=4)


# ---------------------------------------------------------------- tracking fused with the commit
@pytest.mark.parametrize("writes_main", [True, False])
def test_tracking_commit_checkpoints_in_the_same_launch(backend, rng, writes_main):
    config = small_config(verify_writes_main_pool=writes_main)
    manager, store = make(backend, rng, entries=6, block_size=4, config=config)
    reference, ref_store = make("numpy", rng, entries=6, block_size=4, config=config)
    fill_random([manager, reference], rng)
    fill_store(ref_store, rng)
    for pool, ref in zip(store.entry_pools, ref_store.entry_pools, strict=True):
        ref[...] = to_host(pool)
    manager.reshape_intermediate_states(5, 3)
    reference.reshape_intermediate_states(5, 3)
    entries = [store.reserve() for _ in range(5)]
    assert [ref_store.reserve() for _ in range(5)] == entries
    accept = [3, 2, 0, 1, 3]
    steps = [2, 2, 0, 0, -1]  # row 1: step 2 not accepted; row 2: padding; row 4: tracks nothing
    track = [entries[0], entries[1], entries[2], entries[3], entries[4]]
    indices = [4, 3, 2, 1, 0]
    before, sbefore = snapshot(manager), store_snapshot(store)
    for m, s in ((manager, store), (reference, ref_store)):
        b = m.backend
        m.scatter_mtp_states(
            device_int32(b, accept),
            state_indices=device_int32(b, indices),
            store=s,
            track_entries=device_int32(b, track),
            track_steps=device_int32(b, steps),
        )
    assert_same_bits(snapshot(manager), snapshot(reference), "commit")
    assert_same_bits(store_snapshot(store), store_snapshot(ref_store), "tracked entries")
    # the definition, on the reference's result
    got, sgot = snapshot(manager), store_snapshot(store)
    inter = {
        k: before[f"intermediate_{k}"].reshape(config.num_recurrent_layers, -1, *before[k].shape[2:])
        for k in ("recurrent", "conv")
    }
    max_accept = 2 if writes_main else 3
    for row in range(5):
        slot, a, t, e = indices[row], accept[row], steps[row], track[row]
        want = b"".join(inter[k][:, row * 3 + a - 1].tobytes() for k in ("recurrent", "conv"))
        assert state(got, slot) == (want if 1 <= a <= max_accept else state(before, slot)), row
        want = b"".join(inter[k][:, row * 3 + t].tobytes() for k in ("recurrent", "conv"))
        assert entry(sgot, e) == (want if 0 <= t < a else entry(sbefore, e)), row


def test_reference_refuses_repeated_or_unreserved_tracked_entries(rng):
    manager, store = make("numpy", rng, entries=4, block_size=4)
    manager.reshape_intermediate_states(2, 3)
    e = store.reserve()
    before, sbefore = snapshot(manager), store_snapshot(store)
    for track, msg in (([e, e], "must be distinct"), ([e, 3], "not reserved")):
        with pytest.raises(ValueError, match=msg):
            manager.scatter_mtp_states(
                np.array([2, 2], np.int32),
                store=store,
                track_entries=np.array(track, np.int32),
                track_steps=np.array([0, 1], np.int32),
            )
    assert_same_bits(snapshot(manager), before)
    assert_same_bits(store_snapshot(store), sbefore)


def test_reserve_publish_release(backend, rng):
    manager, store = make(backend, rng, entries=2, block_size=2)
    a, b = store.reserve(), store.reserve()
    assert store.is_pinned(a) and store.is_pinned(b) and store.reserve() is None
    h = store.publish(a, [1, 2])
    assert h.entry == a and store.match([1, 2, 3]) == h and not store.is_pinned(a)
    store.release(b)
    with pytest.raises(ValueError, match="not reserved"):
        store.release(b)
    c = store.reserve()
    assert store.publish(c, [1, 2]) == h  # already cached elsewhere: c goes back
    assert len(store) == 1 and store.reserve() is not None


def test_publish_of_a_cached_prefix_frees_its_reserved_entry(backend, rng):
    """The reserved entry goes back to the free list: the next insert takes it and evicts nothing."""
    manager, store = make(backend, rng, entries=2, block_size=2)
    before = snapshot(manager)
    h = store.insert([1, 1], slot=0)
    e = store.reserve()
    assert store.publish(e, [1, 1]) == h and not store.is_pinned(e)
    other = store.insert([2, 2], slot=1)
    assert other.entry == e and store.stats.evictions == 0 and len(store) == 2
    store.restore(h, slot=3)  # still valid: not evicted to make room
    assert state(snapshot(manager), 3) == state(before, 0)


# ---------------------------------------------------------------- the proof on TinyMamba2
def tiny_config(dtype, batch=3, verify=3, writes_main=True):
    heads, dim, size = 2, 4, 8
    return Config(
        num_recurrent_layers=2,
        max_batch_size=batch,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=size,
        conv_dim=heads * dim + 2 * size,
        conv_kernel=4,
        max_intermediate_seq_len=verify,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        verify_writes_main_pool=writes_main,
    )


def decode(model, cache, tokens, slot):
    """Decode ``tokens`` one at a time in ``slot``; return the host outputs ``[T, M]``."""
    return np.stack([to_host(model.decode_step(cache, [t], slots=[slot]))[0] for t in tokens])


def slot_bits(cache, slot):
    return state(snapshot(cache), slot)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_restored_prefix_decodes_to_the_same_bits(backend, rng, dtype):
    config, bs = tiny_config(dtype), 4
    model = TinyMamba2(config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    cache = BACKENDS[backend](config)
    store = PrefixStateCache(cache, entries=4, block_size=bs, namespace="tiny")
    first = rng.integers(0, 32, size=10)
    for i, token in enumerate(first):  # request A: prefill token by token, checkpoint at block boundaries
        decode(model, cache, [token], 0)
        if (i + 1) % bs == 0:
            store.insert(first[: i + 1], slot=0)
    second = np.concatenate([first[:8], rng.integers(0, 32, size=5)])
    handle = store.match(second)
    assert handle is not None and handle.length == 8
    store.restore(handle, slot=1)
    out = decode(model, cache, second[8:], 1)
    plain = BACKENDS[backend](config)
    want = decode(model, plain, second, 1)[8:]
    assert out.tobytes() == want.tobytes()
    assert slot_bits(cache, 1) == slot_bits(plain, 1)
    assert store.stats.hits == 1 and store.stats.hit_tokens == 8


@pytest.mark.parametrize("writes_main", [True, False])
def test_checkpoints_tracked_during_speculative_decoding(backend, rng, writes_main):
    config, bs, verify = tiny_config("float32", writes_main=writes_main), 4, 3
    model = TinyMamba2(config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    cache = BACKENDS[backend](config)
    store = PrefixStateCache(cache, entries=8, block_size=bs)
    active = 2
    prompt = rng.integers(0, 32, size=(active, 3))
    model.prefill(cache, prompt)
    history = [list(row) for row in prompt]
    published = 0
    for _ in range(4):
        drafts = rng.integers(0, 32, size=(active, verify))
        accept = rng.integers(1, verify + 1, size=active)
        entries, steps = [-1] * active, [-1] * active
        for b in range(active):
            p = len(history[b])
            c = (p // bs + 1) * bs  # the next boundary after p
            if c <= p + verify:
                entries[b], steps[b] = store.reserve(), c - p - 1
        model.verify(cache, drafts)
        cache.scatter_mtp_states(
            device_int32(backend, accept),
            store=store,
            track_entries=device_int32(backend, entries),
            track_steps=device_int32(backend, steps),
        )
        for b in range(active):
            p = len(history[b])
            history[b] += list(drafts[b, : accept[b]])
            if entries[b] >= 0:
                if steps[b] < accept[b]:
                    store.publish(entries[b], history[b][: p + steps[b] + 1])
                    published += 1
                else:
                    store.release(entries[b])
    assert published >= 2
    for b in range(active):
        tokens = np.array(history[b] + [int(rng.integers(0, 32))])
        handle = store.match(tokens)
        assert handle is not None and handle.length == (len(tokens) - 1) // bs * bs
        store.restore(handle, slot=2)
        out = decode(model, cache, tokens[handle.length :], 2)
        plain = BACKENDS[backend](config)
        want = decode(model, plain, tokens, 2)[handle.length :]
        assert out.tobytes() == want.tobytes(), b
        assert slot_bits(cache, 2) == slot_bits(plain, 2), b


# ---------------------------------------------------------------- bad inputs: clear error, nothing changed
def host(values, dtype=np.int32):
    return np.asarray(values, dtype=dtype)


def dev(backend, values, dtype=np.int32):
    if backend == "numpy":
        return host(values, dtype)
    from numba import cuda

    return cuda.to_device(host(values, dtype))


class Foreign:
    """A device array of some other library (NumPy backend: must be refused)."""

    __cuda_array_interface__ = {"typestr": "<i4", "shape": (2,), "strides": None, "data": (0, False), "version": 3}


STALE = PrefixHandle(0, 99, 4)
ALIGNED = [1, 2, 3, 4]
# (id, backends or None, call(b, manager, store, handle, reserved), exception, message)
STORE_CASES = [
    ("match(float tokens)", None, lambda b, m, s, h, r: s.match([1.0, 2.0]), TypeError, "tokens must hold integer"),
    ("match(2-D)", None, lambda b, m, s, h, r: s.match([[1, 2]]), ValueError, "tokens must be 1-D"),
    ("match(int64 range)", None, lambda b, m, s, h, r: s.match([2**40]), ValueError, "tokens must hold int32"),
    ("match(device)", None, lambda b, m, s, h, r: s.match(Foreign()), TypeError, "got a device array"),
    ("match(max_tokens=-1)", None, lambda b, m, s, h, r: s.match(ALIGNED, -1), ValueError, "max_tokens must be in"),
    ("match(max_tokens='4')", None, lambda b, m, s, h, r: s.match(ALIGNED, "4"), TypeError, "max_tokens must be an"),
    ("restore(tuple)", None, lambda b, m, s, h, r: s.restore((0, 1, 4), 0), TypeError, "handle must be a Prefix"),
    (
        "restore(entry 9)",
        None,
        lambda b, m, s, h, r: s.restore(PrefixHandle(9, 1, 4), 0),
        IndexError,
        r"handle.entry must be in \[0, 4\), got 9",
    ),
    ("restore(stale)", None, lambda b, m, s, h, r: s.restore(STALE, 0), LookupError, "handle is stale"),
    ("restore(slot 5)", None, lambda b, m, s, h, r: s.restore(h, 5), IndexError, r"slot must be in \[0, 5\), got 5"),
    ("restore(slot '1')", None, lambda b, m, s, h, r: s.restore(h, "1"), TypeError, "slot must be an integer"),
    (
        "restore_many(tuple)",
        None,
        lambda b, m, s, h, r: s.restore_many(h, dev(b, [0])),
        TypeError,
        "handles must be a list",
    ),
    (
        "restore_many(int64)",
        None,
        lambda b, m, s, h, r: s.restore_many([h], dev(b, [0], np.int64)),
        TypeError,
        "slots must have dtype int32",
    ),
    (
        "restore_many(length)",
        None,
        lambda b, m, s, h, r: s.restore_many([h], dev(b, [0, 1])),
        ValueError,
        r"one slot per handle \(1\), got 2",
    ),
    (
        "restore_many(stale)",
        None,
        lambda b, m, s, h, r: s.restore_many([h, STALE], dev(b, [0, 1])),
        LookupError,
        r"handles\[1\] is stale",
    ),
    (
        "restore_many(device)",
        ["numpy"],
        lambda b, m, s, h, r: s.restore_many([h, h], Foreign()),
        TypeError,
        "host numpy.ndarray",
    ),
    (
        "restore_many(same slot)",
        ["numpy"],
        lambda b, m, s, h, r: s.restore_many([h, h], host([1, 1])),
        ValueError,
        "must be distinct",
    ),
    ("insert(0 tokens)", None, lambda b, m, s, h, r: s.insert([], 0), ValueError, "at least 1 token"),
    (
        "insert(5 tokens, slot 5)",
        None,
        lambda b, m, s, h, r: s.insert([1] * 5, 5),
        IndexError,
        r"slot must be in \[0, 5\), got 5",
    ),
    ("insert(kind=1)", None, lambda b, m, s, h, r: s.insert([1] * 5, 0, kind=1), TypeError, "kind must be a str"),
    ("positions(2-D)", None, lambda b, m, s, h, r: s.positions([[1, 2]]), ValueError, "tokens must be 1-D"),
    (
        "positions(prompt_length 3)",
        None,
        lambda b, m, s, h, r: s.positions([1, 2], prompt_length=3),
        ValueError,
        r"prompt_length must be in \[0, 2\]",
    ),
    ("positions(start -1)", None, lambda b, m, s, h, r: s.positions([1, 2], start=-1), ValueError, "start must be in"),
    (
        "insert(slot -1)",
        None,
        lambda b, m, s, h, r: s.insert([7] * 4, -1),
        IndexError,
        r"slot must be in \[0, 5\), got -1",
    ),
    ("insert(bool tokens)", None, lambda b, m, s, h, r: s.insert([True] * 4, 0), TypeError, "tokens must hold integer"),
    (
        "insert_many(array)",
        None,
        lambda b, m, s, h, r: s.insert_many(np.ones((1, 4), int), host([0])),
        TypeError,
        "tokens must be a list",
    ),
    (
        "insert_many(list slots)",
        None,
        lambda b, m, s, h, r: s.insert_many([[7] * 4], [0]),
        TypeError,
        "slots must be a host numpy.ndarray",
    ),
    (
        "insert_many(device slots)",
        None,
        lambda b, m, s, h, r: s.insert_many([[7] * 4], Foreign()),
        TypeError,
        "slots must be a host numpy.ndarray",
    ),
    (
        "insert_many(int64)",
        None,
        lambda b, m, s, h, r: s.insert_many([[7] * 4], host([0], np.int64)),
        TypeError,
        "slots must have dtype int32",
    ),
    (
        "insert_many(length)",
        None,
        lambda b, m, s, h, r: s.insert_many([[7] * 4], host([0, 1])),
        ValueError,
        r"one slot per prefix \(1\), got 2",
    ),
    (
        "insert_many(slot 5)",
        None,
        lambda b, m, s, h, r: s.insert_many([[7] * 4, [8] * 4], host([0, 5])),
        IndexError,
        r"slots\[1\] must be in \[0, 5\), got 5",
    ),
    (
        "insert_many(empty)",
        None,
        lambda b, m, s, h, r: s.insert_many([[7] * 5, []], host([0, 1])),
        ValueError,
        r"tokens\[1\] must hold at least 1 token",
    ),
    ("pin(stale)", None, lambda b, m, s, h, r: s.pin(STALE), LookupError, "handle is stale"),
    ("pin(int)", None, lambda b, m, s, h, r: s.pin(0), TypeError, "handle must be a PrefixHandle"),
    ("unpin(not pinned)", None, lambda b, m, s, h, r: s.unpin(h), ValueError, "is not pinned"),
    ("publish(not reserved)", None, lambda b, m, s, h, r: s.publish(h.entry, ALIGNED), ValueError, "is not reserved"),
    (
        "publish(entry 4)",
        None,
        lambda b, m, s, h, r: s.publish(4, ALIGNED),
        IndexError,
        r"entry must be in \[0, 4\), got 4",
    ),
    ("publish(empty)", None, lambda b, m, s, h, r: s.publish(r, []), ValueError, "at least 1 token"),
    ("release(not reserved)", None, lambda b, m, s, h, r: s.release(h.entry), ValueError, "is not reserved"),
    ("release('1')", None, lambda b, m, s, h, r: s.release("1"), TypeError, "entry must be an integer"),
    (
        "scatter(store only)",
        None,
        lambda b, m, s, h, r: m.scatter_mtp_states(dev(b, [1]), store=s),
        ValueError,
        "go together",
    ),
    (
        "scatter(track int64)",
        None,
        lambda b, m, s, h, r: m.scatter_mtp_states(
            dev(b, [1]), store=s, track_entries=dev(b, [r], np.int64), track_steps=dev(b, [0])
        ),
        TypeError,
        "track_entries must have dtype int32",
    ),
    (
        "scatter(track short)",
        None,
        lambda b, m, s, h, r: m.scatter_mtp_states(
            dev(b, [1, 1]), store=s, track_entries=dev(b, [r, -1]), track_steps=dev(b, [0])
        ),
        ValueError,
        r"track_steps must have the length of accept_lengths \(2\), got 1",
    ),
    (
        "scatter(not a store)",
        None,
        lambda b, m, s, h, r: m.scatter_mtp_states(
            dev(b, [1]), store=3, track_entries=dev(b, [r]), track_steps=dev(b, [0])
        ),
        TypeError,
        "store must be a",
    ),
    (
        "scatter(other manager's store)",
        None,
        lambda b, m, s, h, r: m.scatter_mtp_states(
            dev(b, [1]),
            store=PrefixStateCache(BACKENDS[b](small_config()), entries=1, block_size=4),
            track_entries=dev(b, [0]),
            track_steps=dev(b, [0]),
        ),
        ValueError,
        "belongs to another manager",
    ),
    (
        "copy_slots(int64)",
        None,
        lambda b, m, s, h, r: m.copy_slots(dev(b, [0], np.int64), dev(b, [1])),
        TypeError,
        "src_slots must have dtype int32",
    ),
    (
        "copy_slots(length)",
        None,
        lambda b, m, s, h, r: m.copy_slots(dev(b, [0]), dev(b, [1, 2])),
        ValueError,
        r"dst_slots must have the length of src_slots \(1\), got 2",
    ),
    (
        "copy_slots(shorter dst)",
        None,
        lambda b, m, s, h, r: m.copy_slots(dev(b, [0, 2]), dev(b, [1])),
        ValueError,
        r"dst_slots must have the length of src_slots \(2\), got 1",
    ),
    (
        "copy_slots(2-D)",
        None,
        lambda b, m, s, h, r: m.copy_slots(dev(b, [[0]]), dev(b, [1])),
        ValueError,
        r"src_slots must be 1-D",
    ),
    (
        "copy_slots(device)",
        ["numpy"],
        lambda b, m, s, h, r: m.copy_slots(Foreign(), host([1])),
        TypeError,
        "host numpy.ndarray for the NumPy backend",
    ),
]


def bookkeeping(store):
    return (
        list(store._keys),
        list(store._generations),
        list(store._pins),
        set(store._reserved),
        list(store._lru),
        list(store._free),
        str(store.stats),
        {base: tuple((w, dict(checks)) for w, checks in lengths) for base, lengths in store._tails.items()},
        store._facts.used.tolist(),
    )


@pytest.mark.parametrize(("case_id", "backends", "call", "exc", "msg"), STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_bad_store_input_is_refused_and_changes_nothing(backend, rng, case_id, backends, call, exc, msg):
    if backends is not None and backend not in backends:
        pytest.skip(f"not a bad input for the {backend} backend")
    manager, store = make(backend, rng, entries=4, block_size=4)
    handle = store.insert(ALIGNED, slot=1)
    reserved = store.reserve()
    manager.reshape_intermediate_states(2, 3)
    before, sbefore, books = snapshot(manager), store_snapshot(store), bookkeeping(store)
    with pytest.raises(exc, match=msg):
        call(backend, manager, store, handle, reserved)
    assert_same_bits(snapshot(manager), before, case_id)
    assert_same_bits(store_snapshot(store), sbefore, case_id)
    assert bookkeeping(store) == books, case_id


STORE_CALLS = [
    ("match", lambda s, h: s.match(ALIGNED + [5])),
    ("restore", lambda s, h: s.restore(h, 0)),
    ("restore_many", lambda s, h: s.restore_many([h], host([0]))),
    ("insert", lambda s, h: s.insert([9] * 4, 0)),
    ("insert_many", lambda s, h: s.insert_many([[9] * 4], host([0]))),
    ("pin", lambda s, h: s.pin(h)),
    ("unpin", lambda s, h: s.unpin(h)),
    ("reserve", lambda s, h: s.reserve()),
    ("publish", lambda s, h: s.publish(0, ALIGNED)),
    ("release", lambda s, h: s.release(0)),
]


@pytest.mark.parametrize("how", ["manager closed", "manager moved from", "store closed"])
@pytest.mark.parametrize(("name", "call"), STORE_CALLS, ids=[c[0] for c in STORE_CALLS])
def test_store_of_a_closed_manager_refuses(backend, rng, how, name, call):
    manager, store = make(backend, rng, entries=4, block_size=4)
    handle = store.insert(ALIGNED, slot=1)
    if how == "manager closed":
        manager.close()
    elif how == "manager moved from":
        manager.move()
    else:
        store.close()
    with pytest.raises(ValueError, match="was closed" if how == "store closed" else "closed or moved from"):
        call(store, handle)


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"entries": 0}, ValueError, r"entries must be in \[1, "),
        ({"entries": 2.0}, TypeError, "entries must be an integer"),
        ({"block_size": "4"}, TypeError, "block_size must be an integer"),
        ({"block_size": 0}, ConfigError, "block_size must be >="),
        ({"namespace": b"x"}, TypeError, "namespace must be a str"),
        ({"host_entries": -1}, ValueError, r"host_entries must be in \[0, "),
    ],
)
def test_store_constructor_refuses(backend, kwargs, exc, msg):
    manager = BACKENDS[backend](small_config())
    with pytest.raises(exc, match=msg):
        PrefixStateCache(manager, **{"entries": 2, "block_size": 4, **kwargs})


def test_store_needs_an_open_manager_with_layers(backend):
    with pytest.raises(TypeError, match="manager must be a mamba_cache cache manager"):
        PrefixStateCache(object(), entries=2, block_size=4)
    with pytest.raises(ValueError, match="no recurrent layers"):
        PrefixStateCache(BACKENDS[backend](Config()), entries=2, block_size=4)
    closed = BACKENDS[backend](small_config())
    closed.close()
    with pytest.raises(ValueError, match="closed or moved from"):
        PrefixStateCache(closed, entries=2, block_size=4)


# ---------------------------------------------------------------- host tier
def test_device_evictions_move_to_the_host_tier_and_restore_from_there(backend, rng):
    manager, store = make(backend, rng, entries=1, block_size=2, host_entries=2)
    before = snapshot(manager)
    a = store.insert([1, 2], slot=0)
    b = store.insert([3, 4], slot=1)  # evicts [1, 2] to the host tier
    assert b.entry == a.entry and store.stats.evictions == 1 and store.stats.offloads == 1
    host = store.match([1, 2, 5])
    assert host == PrefixHandle(0, 1, 2, True) and store.stats.host_hits == 1
    assert store.match([3, 4, 5]) == b
    store.restore(host, slot=3)  # host to device, straight into the live slot
    want = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        want[kind][:, 3] = before[kind][:, 0]
    assert_same_bits(snapshot(manager), want, "host restore")
    assert store.insert([1, 2], slot=4) == host  # present in the host tier: refreshed, nothing copied
    with pytest.raises(ValueError, match="host tier"):
        store.restore_many([host], host_array([2]))
    # the host tier's own LRU: host [1, 2] (refreshed above), then [3, 4] arrives, then [5, 6] pushes
    # out the least recently used host entry, which is [1, 2]
    store.insert([5, 6], slot=2)  # evicts [3, 4] to the host tier (a free host entry)
    store.insert([7, 8], slot=2)  # evicts [5, 6] to the host tier, which drops [1, 2]
    assert store.stats.offloads == 3 and len(store) == 3
    assert store.match([1, 2, 0]) is None
    assert store.match([3, 4, 0]).host and store.match([5, 6, 0]).host and not store.match([7, 8, 0]).host


def host_array(values):
    return np.asarray(values, dtype=np.int32)


def test_a_pinned_host_entry_is_never_overwritten(backend, rng):
    manager, store = make(backend, rng, entries=1, block_size=2, host_entries=1)
    before = snapshot(manager)
    store.insert([1, 1], slot=0)
    store.insert([2, 2], slot=1)  # [1, 1] -> host
    held = store.match([1, 1, 0])
    assert held.host
    store.pin(held)
    store.insert([3, 3], slot=2)  # [2, 2] would go to the host, whose one entry is pinned: dropped
    assert store.match([2, 2, 0]) is None and store.match([1, 1, 0]) == held
    store.restore(held, slot=4)
    assert state(snapshot(manager), 4) == state(before, 0)
    store.unpin(held)
    store.insert([4, 4], slot=3)  # now [3, 3] replaces [1, 1] in the host tier
    with pytest.raises(LookupError, match="stale"):
        store.restore(held, slot=4)
    got = store.match([3, 3, 0])
    assert got.host
    store.restore(got, slot=4)
    assert state(snapshot(manager), 4) == state(before, 2)


def test_a_host_hit_refreshes_the_host_tier_lru(backend, rng):
    """Host tier [1, 1], [2, 2] (least recent first); a hit on [1, 1] makes [2, 2] the one the next offload drops."""
    manager, store = make(backend, rng, entries=1, block_size=2, host_entries=2)
    before = snapshot(manager)
    store.insert([1, 1], slot=0)
    store.insert([2, 2], slot=1)  # [1, 1] -> host
    store.insert([3, 3], slot=2)  # [2, 2] -> host
    hit = store.match([1, 1, 0])
    assert hit.host
    store.insert([4, 4], slot=3)  # [3, 3] -> host, which drops its least recently used entry: [2, 2]
    assert store.stats.offloads == 3
    assert store.match([2, 2, 0]) is None
    assert store.match([1, 1, 0]) == hit and store.match([3, 3, 0]).host
    store.restore(hit, slot=4)
    assert state(snapshot(manager), 4) == state(before, 0)


def _host_tier_state(store, host_entry):
    """The bytes of one host-tier entry ([P_host, L, ...]: dense), both kinds."""
    return store._host_pools[0][host_entry].tobytes() + store._host_pools[1][host_entry].tobytes()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_host_tier_moves_every_layer_of_both_kinds_and_nothing_else(backend, rng, config):
    """Offloads into the second and third host entry, restores from them into slots 4 and 1."""
    manager, store = make(backend, rng, entries=1, block_size=4, config=config, host_entries=3)
    for pool in store._host_pools:  # random bits in the host tier too: untouched entries must keep them
        pool[...] = random_bits(rng, pool.shape, pool.dtype)
    store._hfree = [2, 1]  # hand out host entries 1 then 2 (entry 0 stays untouched)
    before = snapshot(manager)
    host_before = [p.copy() for p in store._host_pools]
    store.insert([1] * 4, slot=3)
    store.insert([2] * 4, slot=0)  # [1]*4 -> host entry 1
    store.insert([3] * 4, slot=2)  # [2]*4 -> host entry 2
    sync(manager)
    assert _host_tier_state(store, 1) == state(before, 3)
    assert _host_tier_state(store, 2) == state(before, 0)
    for pool, old in zip(store._host_pools, host_before, strict=True):
        assert pool[0].tobytes() == old[0].tobytes(), "an untouched host entry changed"
    assert_same_bits(snapshot(manager), before, "an offload changed the live slots")
    for prefix, slot in (([1] * 4, 4), ([2] * 4, 1)):
        handle = store.match([*prefix, 9])
        assert handle.host
        store.restore(handle, slot=slot)
    want = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        want[kind][:, 4], want[kind][:, 1] = before[kind][:, 3], before[kind][:, 0]
    assert_same_bits(snapshot(manager), want, "host restore")


def sync(manager):
    if manager.backend == "numba":
        from numba import cuda

        cuda.synchronize()


def _replay_memcpy2d(memory: np.ndarray, fields: dict) -> None:
    """Apply a CUDA_MEMCPY2D (byte addresses into ``memory``) the way the driver does."""
    src = fields["srcDevice"] if fields["srcMemoryType"] == "device" else fields["srcHost"]
    dst = fields["dstDevice"] if fields["dstMemoryType"] == "device" else fields["dstHost"]
    width = fields["WidthInBytes"]
    for y in range(fields["Height"]):
        s, d = src + y * fields["srcPitch"], dst + y * fields["dstPitch"]
        memory[d : d + width] = memory[s : s + width].copy()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("to_host", [True, False], ids=["d2h", "h2d"])
def test_the_2d_copy_fields_move_exactly_one_entry(rng, config, to_host):
    """The CUDA_MEMCPY2D the GPU binding issues, replayed on one byte buffer: the reference's result."""
    from mamba_cache.prefix.host_copy import kind_geometry, memcpy2d_fields

    rows, host_entries, row, host_entry = 4, 3, 2, 1
    for dtype, shape in (
        (config.recurrent_state_dtype, config.recurrent_state_shape),
        (config.conv_state_dtype, config.conv_state_shape),
    ):
        tail = shape[1:]
        device = random_bits(rng, (config.num_recurrent_layers, rows, *tail), dtype)
        host = random_bits(rng, (host_entries, config.num_recurrent_layers, *tail), dtype)
        memory = np.concatenate([device.view(np.uint8).ravel(), host.view(np.uint8).ravel()])
        fields = memcpy2d_fields(
            kind_geometry(device.shape, device.itemsize), 0, row, device.nbytes, host_entry, to_host
        )
        _replay_memcpy2d(memory, fields)
        got_device = memory[: device.nbytes].view(device.dtype).reshape(device.shape)
        got_host = memory[device.nbytes :].view(host.dtype).reshape(host.shape)
        if to_host:
            host[host_entry] = device[:, row]
        else:
            device[:, row] = host[host_entry]
        assert got_device.tobytes() == device.tobytes() and got_host.tobytes() == host.tobytes()


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
@pytest.mark.parametrize("pitch", ["2d", "per-layer"])
def test_host_tier_copy_on_the_gpu_one_2d_copy_per_kind(rng, pitch):
    """The driver path: 2 copies per call (or the per-layer fallback past the max pitch), same bits."""
    from numba import cuda

    from mamba_cache.prefix import host_copy

    config = CONFIGS["f64-big"]
    manager, store = make("numba", rng, entries=2, block_size=4, config=config, host_entries=3)
    for pool in store._host_pools:
        pool[...] = random_bits(rng, pool.shape, pool.dtype)
    limit = host_copy.max_pitch(manager.device_id) if pitch == "2d" else 1
    stream = cuda.stream()
    ref = manager._stream(stream)
    down = host_copy.HostTierCopy(store.entry_pools, store._host_pools, True, limit)
    up = host_copy.HostTierCopy((manager.pools.recurrent, manager.pools.conv), store._host_pools, False, limit)
    assert down.copies_per_call == (2 if pitch == "2d" else 2 * config.num_recurrent_layers)
    entries, host_before, before = store_snapshot(store), [p.copy() for p in store._host_pools], snapshot(manager)
    down.copy(1, 2, ref.handle)
    up.copy(2, 0, ref.handle)  # host entry 0 into slot 2
    stream.synchronize()
    for k, (pool, old) in enumerate(zip(store._host_pools, host_before, strict=True)):
        want = old.copy()
        want[2] = entries[("entries_recurrent", "entries_conv")[k]][:, 1]
        assert pool.tobytes() == want.tobytes()
    want = {k: v.copy() for k, v in before.items()}
    for k, kind in enumerate(("recurrent", "conv")):
        want[kind][:, 2] = host_before[k][0]
    assert_same_bits(snapshot(manager), want, "h2d")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
def test_host_tier_copies_are_ordered_across_streams(rng):
    """A slow kernel fills a device entry on stream A; the eviction's offload runs on stream B.

    Without the event the offload would copy the entry before the slow kernel wrote it, and the
    restore on stream C would then read a host entry whose copy had not landed.
    """
    from numba import cuda

    config = small_config(recurrent_state_head_dim=64, conv_dim=257, max_intermediate_seq_len=2)
    manager = BACKENDS["numba"](config)
    fill_random([manager], rng)
    store = PrefixStateCache(manager, entries=1, block_size=2, host_entries=1)
    a, b, c = cuda.stream(), cuda.stream(), cuda.stream()
    slow = _slow_kernel()
    clock = cuda.device_array(1, dtype=np.int64)
    slow[1, 1](clock, 1)  # compile it before timing matters
    cuda.synchronize()
    want = snapshot(manager)
    for _ in range(3):
        slow[1, 1, a](clock, 100)  # ~0.1 s of sleeping ahead of the insert on stream a
        store.insert([1, 1], slot=0, stream=a)
        store.insert([2, 2], slot=1, stream=b)  # evicts [1, 1]: the offload must wait for a's insert
        handle = store.match([1, 1, 0])
        assert handle.host
        store.restore(handle, slot=3, stream=c)  # must wait for b's offload
        c.synchronize()
        got = snapshot(manager)
        assert state(got, 3) == state(want, 0)
        cuda.synchronize()
        manager.copy_slots(device_int32("numba", [4]), device_int32("numba", [3]))  # scramble slot 3 again
        cuda.synchronize()
        want = snapshot(manager)
        store.close()
        store = PrefixStateCache(manager, entries=1, block_size=2, host_entries=1)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
def test_restore_many_captures_into_a_cuda_graph(rng):
    """Staged once before the capture, the entry list is a device buffer the replay re-reads."""
    from cuda.bindings import driver
    from numba import cuda

    def check(result):
        assert result[0] == driver.CUresult.CUDA_SUCCESS, result
        return result[1] if len(result) == 2 else None

    manager, store = make("numba", rng, entries=3, block_size=2)
    handles = store.insert_many([[1, 1], [2, 2], [3, 3]], np.array([0, 1, 2], np.int32))
    stream = cuda.stream()
    slots = cuda.to_device(np.array([4, 3], np.int32), stream=stream)
    pair = [handles[2], handles[0]]
    store.restore_many(pair, slots, stream=stream)  # stages the entry list outside the capture
    stream.synchronize()
    check(driver.cuStreamBeginCapture(int(stream.handle), driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    store.restore_many(pair, slots, stream=stream)
    exec_graph = check(driver.cuGraphInstantiate(check(driver.cuStreamEndCapture(int(stream.handle))), 0))
    for _ in range(2):
        fill_random([manager], rng)
        want = snapshot(manager)
        entries = store_snapshot(store)
        for kind in ("recurrent", "conv"):
            want[kind][:, 4] = entries[f"entries_{kind}"][:, 2]
            want[kind][:, 3] = entries[f"entries_{kind}"][:, 0]
        check(driver.cuGraphLaunch(exec_graph, int(stream.handle)))
        stream.synchronize()
        assert_same_bits(snapshot(manager), want, "restore_many graph replay")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
def test_host_tier_copies_neither_block_the_host_nor_run_early(rng):
    """Offload and host restore queued behind a ~0.2 s kernel return at once and land after it.

    A pageable host buffer or a synchronising copy would make the calls wait for the kernel.
    """
    import time

    from numba import cuda

    config = small_config(recurrent_state_head_dim=64, conv_dim=257, num_recurrent_layers=5)
    manager, store = make("numba", rng, entries=1, block_size=4, config=config, host_entries=2)
    stream = cuda.stream()
    slow = _slow_kernel()
    clock = cuda.device_array(1, dtype=np.int64)
    slow[1, 1, stream](clock, 1)
    store.insert([1] * 4, slot=0, stream=stream)
    stream.synchronize()
    before = snapshot(manager)
    slow[1, 1, stream](clock, 200)
    t0 = time.perf_counter()
    store.insert([2] * 4, slot=1, stream=stream)  # evicts [1]*4: a device-to-host offload
    store.restore(store.match([1] * 5), slot=3, stream=stream)  # host to device
    elapsed = time.perf_counter() - t0
    from cuda.bindings import driver

    (status,) = driver.cuStreamQuery(int(stream.handle))
    pending = status == driver.CUresult.CUDA_ERROR_NOT_READY  # the copies still wait for the kernel
    stream.synchronize()
    assert elapsed < 0.05 and pending, f"the host waited {elapsed:.3f} s for the stream"
    want = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        want[kind][:, 3] = before[kind][:, 0]
    assert_same_bits(snapshot(manager), want, "offload + host restore behind a slow kernel")


def _slow_kernel():
    from numba import cuda

    @cuda.jit
    def spin(out, milliseconds):
        for _ in range(milliseconds):
            cuda.nanosleep(1_000_000)
        out[0] = milliseconds

    return spin


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
def test_copy_slots_and_tracking_commit_capture_into_a_cuda_graph(rng):
    """Both launches are captured with their index arrays on the device and replayed with new values."""
    from cuda.bindings import driver
    from numba import cuda

    def check(result):
        assert result[0] == driver.CUresult.CUDA_SUCCESS, result
        return result[1] if len(result) == 2 else None

    config = small_config(max_intermediate_seq_len=3)
    ref, dev = BACKENDS["numpy"](config), BACKENDS["numba"](config)
    ref_store = PrefixStateCache(ref, entries=4, block_size=3)
    dev_store = PrefixStateCache(dev, entries=4, block_size=3)
    stream = cuda.stream()
    handle = int(stream.handle)
    arrays = {name: cuda.to_device(np.full(3, -1, np.int32), stream=stream) for name in ("src", "dst", "acc", "e", "t")}
    for m in (ref, dev):
        m.reshape_intermediate_states(3, 3)
    entries = [dev_store.reserve() for _ in range(3)]
    assert [ref_store.reserve() for _ in range(3)] == entries

    def calls():
        dev.copy_slots(arrays["src"], arrays["dst"], stream=stream)
        dev.scatter_mtp_states(
            arrays["acc"], stream=stream, store=dev_store, track_entries=arrays["e"], track_steps=arrays["t"]
        )

    calls()  # prepares both launches outside the capture
    stream.synchronize()
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    calls()
    exec_graph = check(driver.cuGraphInstantiate(check(driver.cuStreamEndCapture(handle)), 0))
    for _ in range(3):
        fill_random([ref, dev], rng)
        for pool, ref_pool in zip(dev_store.entry_pools, ref_store.entry_pools, strict=True):
            values = random_bits(rng, pool.shape, pool.dtype)
            pool.copy_to_device(values)
            ref_pool[...] = values
        perm = rng.permutation(5)
        values = {
            "src": perm[:2].tolist() + [7],
            "dst": perm[2:4].tolist() + [int(perm[4])],
            "acc": rng.integers(0, 4, size=3).tolist(),
            "e": rng.permutation(entries).tolist(),
            "t": rng.integers(-1, 3, size=3).tolist(),
        }
        for name, v in values.items():
            arrays[name].copy_to_device(np.asarray(v, np.int32), stream=stream)
        check(driver.cuGraphLaunch(exec_graph, handle))
        stream.synchronize()
        ref.copy_slots(host_array(values["src"]), host_array(values["dst"]))
        ref.scatter_mtp_states(
            host_array(values["acc"]),
            store=ref_store,
            track_entries=host_array(values["e"]),
            track_steps=host_array(values["t"]),
        )
        assert_same_bits(snapshot(ref), snapshot(dev), f"graph replay {values}")
        assert_same_bits(store_snapshot(ref_store), store_snapshot(dev_store), f"graph replay {values}")


# ---------------------------------------------------------------- planning
def test_cli_plan_prints_the_store_rows(capsys):
    from mamba_cache.cli import main

    argv = ["plan", "--preset", "nemotron-h-8b", "--batch", "8", "--mtp", "4", "--tp", "2", "--budget", "20GiB"]
    assert main([*argv, "--prefix-entries", "32", "--host-entries", "64"]) == 0
    out = capsys.readouterr().out
    # by hand: 24 layers x (64 x 64 x 128 + 5120 x 4) fp16 = 26148864 bytes an entry
    assert "one entry (one slot of every layer) is 24.94 MiB (26148864 bytes)" in out
    assert "[32, 64, 64, 128]" in out and "768.00 MiB" in out and "1.56 GiB" in out
    # (20 GiB - 997.5 MiB of pools) // 26148864 bytes
    assert "beside batch 8: 781" in out


def test_store_nbytes_match_the_plan(backend):
    from mamba_cache.prefix.plan import entry_bytes

    config = small_config()
    store = PrefixStateCache(BACKENDS[backend](config), entries=3, block_size=4, host_entries=2)
    assert store.nbytes == 3 * entry_bytes(config) and store.host_nbytes == 2 * entry_bytes(config)
