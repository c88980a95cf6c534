"""Checkpoints off the block grid: tail keys, the longest match over grid and tail keys, both tiers, both backends."""

import hashlib

import numpy as np
import pytest
from helpers import BACKENDS, assert_same_bits, device_int32, simulator_long, snapshot
from test_prefix import decode, entry, make, slot_bits, state, store_snapshot, tiny_config
from test_replay_models import tiny_config as replay_tiny_config

from mamba_cache.models.gdn import TinyGatedDeltaNet
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.prefix import PrefixHandle, PrefixStateCache, block_digests, prefix_key, root_digest, tail_digest
from mamba_cache.prefix import index as index_module


def test_tail_key_is_the_documented_personalised_blake2b(rng):
    tokens = rng.integers(-(2**31), 2**31, size=19).astype(np.int64)
    bs, namespace = 5, "ns/ä"
    chain = [root_digest(namespace), *block_digests(tokens, bs, namespace)]
    for n in range(1, tokens.size + 1):
        q, r = divmod(n, bs)
        if not r:
            assert prefix_key(tokens[:n], bs, namespace) == chain[q]  # grid keys are unchanged
            continue
        tail = b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens[q * bs : n])
        want = hashlib.blake2b(chain[q] + tail, digest_size=16, person=b"tail").digest()
        assert prefix_key(tokens[:n], bs, namespace) == want, n
        assert prefix_key(list(tokens[:n]), bs, namespace) == want  # any integer sequence
    # the personalisation keeps a tail apart from a block of the same bytes
    block = tokens[:bs].astype(np.int32)
    assert tail_digest(chain[0], block) != chain[1]
    with pytest.raises(ValueError, match="at least 1 token"):
        prefix_key([], bs, namespace)


def test_off_grid_insert_match_restore(backend, rng):
    manager, store = make(backend, rng, entries=6, block_size=4)
    prompt = rng.integers(0, 1000, size=14)
    before, sbefore = snapshot(manager), store_snapshot(store)
    h6 = store.insert(prompt[:6], slot=2)
    assert h6 == PrefixHandle(0, 1, 6)
    assert entry(store_snapshot(store), 0) == state(before, 2)
    assert_same_bits(snapshot(manager), before, "insert changes no slot")
    assert store.match(prompt) == h6
    assert store.match(prompt[:6]) is None  # leaves nothing to run
    assert store.match(prompt[:7]) == h6
    assert store.match(prompt, max_tokens=5) is None
    h8 = store.insert(prompt[:8], slot=0)
    h11 = store.insert(prompt[:11], slot=1)
    h1 = store.insert(prompt[:1], slot=3)
    assert store.match(prompt) == h11
    assert store.match(prompt, max_tokens=10) == h8  # the grid key between the two tails
    assert store.match(prompt, max_tokens=7) == h6
    assert store.match(prompt[:3]) == h1  # a tail under d_0, the namespace's digest
    other = prompt.copy()
    other[9] += 1  # same first two blocks, another tail
    assert store.match(other) == h8
    store.restore(h11, slot=4)
    want = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        want[kind][:, 4] = before[kind][:, 1]
    assert_same_bits(snapshot(manager), want, "restore of an off-grid entry")
    untouched = store_snapshot(store)
    for e in range(4, 6):
        assert entry(untouched, e) == entry(sbefore, e)
    stats = store.stats
    assert stats.lookups == 9 and stats.hits == 7 and stats.grid_hits == 2 and stats.offgrid_hits == 5
    assert stats.prompt_tokens == 14 * 6 + 6 + 7 + 3 and stats.hit_tokens == 6 * 2 + 11 + 8 * 2 + 1 + 6
    assert "token_hit_rate=0.460" in str(stats)


def tail_count(store) -> int:
    """Off-grid entries the tail index counts (both tiers)."""
    return sum(n for lengths in store._tails.values() for _, checks in lengths for n in checks.values())


def test_match_digests_each_block_once_and_only_tails_that_can_match(rng, monkeypatch):
    """One block digest per whole block; a tail digest only where a stored tail's hash check passes."""
    _, store = make("numpy", rng, entries=8, block_size=4)
    prompt = rng.integers(0, 1000, size=40)
    other = prompt.copy()
    other[8] += 1  # shares two blocks with prompt, then a tail of its own
    for tokens in (prompt[:5], prompt[:6], prompt[:13], other[:10], rng.integers(0, 9, size=3)):
        store.insert(tokens, slot=0)
    tails, blocks = [], []
    real_tail, real_chain = index_module.tail_digest, index_module.digest_chain
    monkeypatch.setattr(
        index_module, "tail_digest", lambda base, tail: tails.append(tail.size) or real_tail(base, tail)
    )
    monkeypatch.setattr(
        index_module, "digest_chain", lambda d, bs, root, n: blocks.append(n) or real_chain(d, bs, root, n)
    )
    assert store.match(prompt).length == 13
    assert blocks == [39 // 4] and tails == [1]  # the first tail tried, under d_3, is the hit
    tails.clear(), blocks.clear()
    assert store.match(prompt, max_tokens=12).length == 6
    # d_3's tail (13) is past the limit; d_2 holds other's tail (r = 2), whose check fails: no digest;
    # d_1: r = 2 passes and hits
    assert blocks == [12 // 4] and tails == [2]
    tails.clear(), blocks.clear()
    assert store.match(other[:11]).length == 10  # other's tail: its check passes, then its digest
    assert tails == [2]
    tails.clear(), blocks.clear()
    assert store.match(rng.integers(2000, 3000, size=4000)) is None
    assert blocks == [3999 // 4] and tails == []  # the unrelated 3-token tail under d_0 fails its check


def test_tail_lengths_are_tried_longest_first_whatever_their_insert_and_evict_order(rng):
    _, store = make("numpy", rng, entries=3, block_size=8)
    prompt = rng.integers(0, 1000, size=20)
    for n in (9, 13, 11):  # three tails under d_1, inserted out of order
        store.insert(prompt[:n], slot=0)
    assert store.match(prompt).length == 13
    assert store.match(prompt, max_tokens=12).length == 11
    assert store.match(prompt, max_tokens=10).length == 9
    assert store.match(prompt).length == 13  # 11 is now the least recent
    store.insert(rng.integers(2000, 3000, size=16), slot=0)  # evicts 11, the middle length
    assert store.match(prompt, max_tokens=12).length == 9
    assert store.match(prompt).length == 13  # the unrelated prefix is now the least recent
    store.insert(prompt[:15], slot=0)  # a new longest length after the removal
    assert store.match(prompt).length == 15 and store.match(prompt, max_tokens=14).length == 13
    assert tail_count(store) == 3


def test_evictions_and_the_host_tier_keep_the_tail_index(backend, rng):
    manager, store = make(backend, rng, entries=2, block_size=4, host_entries=1)
    a, b, c = (rng.integers(0, 100, size=n) for n in (6, 7, 9))
    ha = store.insert(a, slot=0)
    store.pin(ha)
    hb = store.insert(b, slot=1)
    hc = store.insert(c, slot=2)  # evicts b (not pinned) into the host tier
    assert hc.entry == hb.entry and store.stats.offloads == 1
    host = store.match(np.concatenate([b, [1]]))
    assert host.host and host.length == 7 and store.stats.host_hits == 1 and store.stats.offgrid_hits == 1
    store.restore(host, slot=3)
    assert slot_bits(manager, 3) == slot_bits(manager, 1)
    store.insert(np.concatenate([c, [5, 5]]), slot=4)  # evicts c to the host tier, which drops b
    assert store.match(np.concatenate([b, [1]])) is None
    assert store.match(np.concatenate([a, [1]])) == ha  # pinned: never evicted
    assert tail_count(store) == len(store)  # every key in either tier, no more
    store.unpin(ha)
    for i in range(3):
        store.insert(rng.integers(200, 300, size=8), slot=i)  # grid entries push out every tail
    assert not store._tails and not store._tail_of


@simulator_long(backend="numba", dtype="float16")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_restored_off_grid_prefix_decodes_to_the_same_bits(backend, rng, dtype):
    config, bs = tiny_config(dtype), 4
    model = TinyMamba2(config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    cache = BACKENDS[backend](config)
    store = PrefixStateCache(cache, entries=4, block_size=bs, placement="end_of_prompt")
    first = rng.integers(0, 32, size=7)  # a chat turn of 7 tokens: off the grid
    decode(model, cache, first, 0)
    (spot,) = store.positions(first)
    assert spot.length == 7
    store.insert(first[: spot.length], slot=0, kind=spot.kind)
    second = np.concatenate([first, rng.integers(0, 32, size=5)])
    handle = store.match(second)
    assert handle is not None and handle.length == 7
    store.restore(handle, slot=1)
    out = decode(model, cache, second[7:], 1)
    plain = BACKENDS[backend](config)
    want = decode(model, plain, second, 1)[7:]
    assert out.tobytes() == want.tobytes()
    assert slot_bits(cache, 1) == slot_bits(plain, 1)
    assert store.stats.offgrid_hits == 1 and store.stats.hit_tokens == 7


@simulator_long(backend="numba")
def test_gated_deltanet_off_grid_checkpoint_decodes_to_the_same_bits(backend, rng):
    """The same proof on the Gated DeltaNet model: the state after 9 tokens (bs 4), restored and continued."""
    config = replay_tiny_config("float32", commit_mode="scatter", mixer="gdn")
    model = TinyGatedDeltaNet(config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    cache = BACKENDS[backend](config)
    store = PrefixStateCache(cache, entries=2, block_size=4, placement="end_of_prompt")
    first = rng.integers(0, 32, size=9)
    decode(model, cache, first, 0)
    store.insert(first, slot=0)
    second = np.concatenate([first, rng.integers(0, 32, size=4)])
    handle = store.match(second)
    assert handle.length == 9
    store.restore(handle, slot=1)
    out = decode(model, cache, second[9:], 1)
    plain = BACKENDS[backend](config)
    want = decode(model, plain, second, 1)[9:]
    assert out.tobytes() == want.tobytes() and slot_bits(cache, 1) == slot_bits(plain, 1)


def test_tracking_publishes_an_off_grid_checkpoint(backend, rng):
    config, bs, verify = tiny_config("float32"), 4, 3
    model = TinyMamba2(config, vocab_size=32, seed=int(rng.integers(1 << 30)))
    cache = BACKENDS[backend](config)
    store = PrefixStateCache(cache, entries=2, block_size=bs)
    prompt = rng.integers(0, 32, size=(1, 5))
    model.prefill(cache, prompt)
    drafts = rng.integers(0, 32, size=(1, verify))
    entry_id = store.reserve()
    model.verify(cache, drafts)
    cache.scatter_mtp_states(
        device_int32(backend, [3]),
        store=store,
        track_entries=device_int32(backend, [entry_id]),
        track_steps=device_int32(backend, [1]),  # the state after 5 + 2 = 7 tokens
    )
    history = np.concatenate([prompt[0], drafts[0]])
    handle = store.publish(entry_id, history[:7])
    assert handle.length == 7
    tokens = np.concatenate([history[:7], rng.integers(0, 32, size=3)])
    assert store.match(tokens) == handle
    store.restore(handle, slot=2)
    out = decode(model, cache, tokens[7:], 2)
    plain = BACKENDS[backend](config)
    want = decode(model, plain, tokens, 2)[7:]
    assert out.tobytes() == want.tobytes() and slot_bits(cache, 2) == slot_bits(plain, 2)
