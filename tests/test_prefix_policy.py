"""Placements (where to checkpoint) and policies (what to keep) of the prefix store, and its guardrail."""

import warnings

import numpy as np
import pytest
from helpers import assert_same_bits, snapshot
from test_prefix import bookkeeping, make, store_snapshot

from mamba_cache.prefix import BlockSizeWarning, Checkpoint, PrefixStateCache, make_placement, make_policy
from mamba_cache.prefix.policy import FlopAware, SegLen


def lengths(checkpoints):
    return [c.length for c in checkpoints]


# ---------------------------------------------------------------- placements
def test_placements_name_positions_the_state_has_consumed(rng):
    prompt, sampled = rng.integers(0, 100, size=11), rng.integers(0, 100, size=5)
    request = np.concatenate([prompt, sampled])  # the last sampled token has not run: 15 consumed
    cases = {
        "every_block": ([4, 8], [4, 8, 12]),
        "end_of_prompt": ([11], [11]),
        "end_of_request": ([11], [15]),
        "before_end:3": ([8], [8]),
        "end_of_prompt+before_end:3+every_block": ([4, 8, 11], [4, 8, 11, 12]),
    }
    for name, (at_prefill, at_end) in cases.items():
        _, store = make("numpy", rng, block_size=4, placement=name)
        assert lengths(store.positions(prompt)) == at_prefill, name
        assert lengths(store.positions(request, prompt_length=11)) == at_end, name
        assert lengths(store.positions(request, prompt_length=11, start=8)) == [n for n in at_end if n > 8], name
    _, store = make("numpy", rng, block_size=4, placement="end_of_prompt+every_block")
    assert store.positions(prompt) == [Checkpoint(4, "block"), Checkpoint(8, "block"), Checkpoint(11, "end_of_prompt")]
    _, store = make("numpy", rng, block_size=4, placement="before_end:20")
    assert store.positions(prompt) == []  # before the start of the prompt: nothing


def test_branch_point_is_where_a_prompt_leaves_the_requests_seen(rng):
    _, store = make("numpy", rng, entries=4, block_size=4, placement="branch_point")
    system = rng.integers(0, 100, size=10)  # a shared prefix of 10 tokens: off the grid
    first = np.concatenate([system, [200, 201, 202]])
    second = np.concatenate([system, [300, 301, 302, 303, 304]])
    assert store.match(first) is None
    assert store.positions(first) == []  # nothing seen before it
    assert store.match(second) is None
    assert store.positions(second) == [Checkpoint(10, "branch_point")]
    third = np.concatenate([system[:6], [7, 7, 7, 7, 7]])  # leaves the others inside block 2
    store.match(third)
    assert lengths(store.positions(third)) == [6]


# ---------------------------------------------------------------- policies
def test_flop_aware_keeps_the_checkpoint_that_saves_most(rng):
    kept = {}
    for policy in ("lru", "flop_aware"):
        _, store = make("numpy", rng, entries=3, block_size=4, policy=policy)
        long = store.insert(rng.integers(0, 9, size=40), slot=0)  # oldest, but saves 40 tokens of prefill
        store.insert(rng.integers(0, 9, size=3), slot=1)
        store.insert(rng.integers(0, 9, size=5), slot=2)
        store.insert(rng.integers(0, 9, size=6), slot=3)  # a full store: one goes
        kept[policy] = store._lengths[long.entry] == 40 and store._generations[long.entry] == long.generation
    assert kept == {"lru": False, "flop_aware": True}


def test_flop_aware_evicts_a_superseded_turn_first_and_a_branch_point_last(rng):
    _, store = make("numpy", rng, entries=4, block_size=4, policy="flop_aware")
    chat = rng.integers(0, 50, size=40)
    turn1 = store.insert(chat[:10], slot=0)
    store.insert(rng.integers(50, 99, size=3), slot=1)  # short, old: the first to go by utility alone
    turn2 = store.insert(chat[:25], slot=2)  # supersedes turn 1 (its one cached extension)
    assert store._facts.children[turn1.entry] == 1 and store._facts.children[turn2.entry] == 0
    store.insert(rng.integers(100, 150, size=30), slot=3)
    store.insert(rng.integers(150, 199, size=30), slot=4)  # full: turn 1 goes, not the short old one
    assert store._generations[turn1.entry] != turn1.generation
    assert store.match(chat).length == 25
    # a branch point: two cached extensions of one prefix stay while anything else can go
    _, store = make("numpy", rng, entries=3, block_size=4, policy="flop_aware")
    shared = store.insert(chat[:6], slot=0)
    for tail in (chat[6:9], rng.integers(100, 150, size=3)):
        store.insert(np.concatenate([chat[:6], tail]), slot=1)
    assert store._facts.children[shared.entry] == 2
    store.insert(rng.integers(150, 199, size=40), slot=2)
    assert store._generations[shared.entry] == shared.generation


def test_flop_aware_drops_a_superseded_turn_at_once_unless_pinned(rng):
    chat = rng.integers(0, 50, size=40)
    others = [rng.integers(50 + 50 * i, 99 + 50 * i, size=30) for i in range(2)]

    def run(at_once, pin=False):
        _, store = make("numpy", rng, entries=3, block_size=4, policy=FlopAware(at_once=at_once))
        a, b = (store.insert(o, slot=0) for o in others)  # two other conversations, 30 tokens each
        turn1 = store.insert(chat[:10], slot=1)  # the store is full
        if pin:
            store.pin(turn1)
        turn2 = store.insert(chat[:25], slot=2)  # turn 1's one cached extension
        alive = {n: store._generations[h.entry] == h.generation for n, h in (("a", a), ("b", b), ("turn1", turn1))}
        assert store.match(chat).length == 25 and turn2.length == 25
        return {n for n, ok in alive.items() if not ok}

    # by utility alone the oldest other conversation goes (turn 1 is not superseded yet when the entry is taken)
    assert run(at_once=False) == {"a"}
    assert run(at_once=True) == {"turn1"}  # the superseded turn's own entry, no live one
    assert run(at_once=True, pin=True) == {"a"}  # a pinned ancestor is never taken
    # a branch point (a prefix two requests shared) is not superseded by its first cached extension
    _, store = make("numpy", rng, entries=3, block_size=4, policy=FlopAware(at_once=True))
    a, b = (store.insert(o[:3], slot=0) for o in others)  # short and old: the lowest utility
    shared = store.insert(chat[:10], slot=0, kind="branch_point")
    store.insert(chat[:25], slot=1, kind="end_of_request")
    assert store._generations[shared.entry] == shared.generation and store.match(chat[:11]).length == 10
    assert store._generations[a.entry] != a.generation  # the victim by utility went instead


def test_flop_aware_admits_a_block_boundary_only_once_shared(rng):
    manager, store = make("numpy", rng, entries=3, block_size=4, policy="flop_aware", placement="every_block")
    prompt = rng.integers(0, 100, size=9)
    store.match(prompt)
    before, sbefore, books = snapshot(manager), store_snapshot(store), bookkeeping(store)
    (spot, _) = store.positions(prompt)
    assert store.insert(prompt[: spot.length], slot=0, kind=spot.kind) is None  # one request passed it
    assert store.stats.rejected_inserts == 1
    assert_same_bits(snapshot(manager), before), assert_same_bits(store_snapshot(store), sbefore)
    assert bookkeeping(store)[:6] == books[:6]  # nothing stored, nothing evicted
    assert store.insert(prompt[:9], slot=0, kind="end_of_prompt") is not None  # a sequence end: reusable
    store.match(np.concatenate([prompt[:5], [1, 2]]))  # a second request passes the boundary at 4
    assert store.insert(prompt[:4], slot=0, kind="block") is not None
    assert store.insert(prompt[:8], slot=0) is not None  # no kind: the caller's own choice


def test_seglen_evicts_the_shortest_replay(rng):
    _, store = make("numpy", rng, entries=3, block_size=4, policy="seglen")
    base = rng.integers(0, 9, size=30)
    a = store.insert(base[:8], slot=0)
    b = store.insert(base[:9], slot=1)  # one token past its ancestor a: replay 1
    c = store.insert(rng.integers(20, 29, size=30), slot=2)  # no ancestor: replay 30
    assert store._facts.replay[[a.entry, b.entry, c.entry]].tolist() == [8, 1, 30]
    store.insert(rng.integers(40, 49, size=12), slot=3)
    assert store._keys[b.entry] != b and store._lengths[b.entry] == 12  # b went, though a is older
    _, store = make("numpy", rng, entries=2, block_size=4, policy="seglen")
    a = store.insert(base[:8], slot=0)
    b = store.insert(base[:9], slot=1)
    store.pin(b)
    store.insert(rng.integers(40, 49, size=12), slot=3)  # evicts a: b's replay grows by a's
    assert store._facts.replay[b.entry] == 9


@pytest.mark.parametrize("policy", ["lru", "flop_aware", "seglen"])
def test_no_policy_evicts_a_pinned_entry(rng, policy):
    _, store = make("numpy", rng, entries=3, block_size=4, policy=policy)
    for i, n in enumerate((3, 40, 9)):
        store.insert(rng.integers(0, 9, size=n), slot=i)
    for _ in range(3):  # pin the entry the policy would evict now: the next insert must spare it
        victim = store.policy.victim([e for e in store._lru if not store._pins[e]], store._facts)
        held = store._handle(victim)
        store.pin(held)
        store.insert(rng.integers(100, 999, size=int(rng.integers(1, 30))), slot=3)
        assert store._generations[victim] == held.generation
    # two inserts evicted an unpinned entry; the third found every entry pinned: dropped
    assert all(store.is_pinned(e) for e in range(3)) and store.stats.evictions == 2
    assert store.stats.dropped_inserts == 1


def test_policies_and_placements_by_name_and_their_refusals():
    assert make_policy("flop_aware").name == "flop_aware" and isinstance(make_policy(SegLen(0.5)), SegLen)
    assert make_placement("end_of_request+branch_point").uses_radix
    for bad, exc, msg in [
        (("policy", "mru"), ValueError, r"policy must be one of \['flop_aware', 'lru', 'seglen'\]"),
        (("policy", 3), TypeError, "policy must be a policy name or a Policy"),
        (("placement", "every"), ValueError, "placement must name placements of"),
        (("placement", "before_end"), ValueError, "before_end needs a token count"),
        (("placement", "end_of_prompt:3"), ValueError, "takes no argument"),
        (("placement", None), TypeError, "placement must be a placement name"),
    ]:
        with pytest.raises(exc, match=msg):
            (make_policy if bad[0] == "policy" else make_placement)(bad[1])
    with pytest.raises(ValueError, match="weight must be in"):
        SegLen(1.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        FlopAware(alpha=-1)


# ---------------------------------------------------------------- guardrail
def test_block_size_warning_fires_once_with_numbers(rng):
    _, store = make("numpy", rng, block_size=64)
    with pytest.warns(BlockSizeWarning, match=r"block_size 64 is at least the length of 2[0-9] of the first 32"):
        for i in range(32):
            store.match(rng.integers(0, 9, size=20 if i % 4 else 100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(40):
            store.match(rng.integers(0, 9, size=10))  # once only
    for placement, size in (("end_of_prompt", 10), ("every_block", 100)):  # off the grid; long prompts
        _, quiet = make("numpy", rng, block_size=64, placement=placement)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(40):
                quiet.match(rng.integers(0, 9, size=size))


def test_store_takes_placement_and_policy_objects(rng):
    manager, _ = make("numpy", rng)
    store = PrefixStateCache(
        manager, entries=2, block_size=4, placement=make_placement("before_end:1"), policy=SegLen()
    )
    assert store.placement.name == "before_end:1" and store.policy.name == "seglen"
