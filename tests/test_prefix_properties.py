"""Property tests of the prefix-state store against a plain Python model of its contract.

Hypothesis draws sequences of insert / insert_many / match+restore / pin / unpin / reserve,
publish and release (a reservation may stay open across other operations) on a tiny store (1 to
3 device entries, 0 to 3 host entries, bs = 2, a pool of nested prefixes over two tokens, on the
block grid and off it), so
that within a few steps the store is full, prefixes repeat, evictions go to the host tier and
matches hit there. Most choices name a prefix the model holds now (a repeat, a host hit) rather
than a random one. After every step the store must agree with the model: the same prefixes in the
same LRU order in each tier, the same free entries, every counter of ``stats``, and its
invariants: no pinned entry is evicted, a match is the longest cached prefix, every handle
returned names its prefix, and every entry holds exactly the state recorded for its own prefix.
"""

import itertools
import zlib
from collections import Counter, OrderedDict

import numpy as np
from helpers import small_config, writable_pools
from hypothesis import given
from hypothesis import strategies as st

from mamba_cache import NumpyMambaCacheManager
from mamba_cache.prefix import PrefixHandle, PrefixStateCache, PrefixStats, prefix_key

BS = 2
#: The prefixes drawn, shortest first (hypothesis shrinks toward them): chains that share blocks.
PREFIXES = [
    (0, 0),
    (1, 1),
    (0, 1),
    (0, 0, 1, 1),
    (1, 1, 0, 0),
    (0, 0, 0, 0),
    (0, 1, 1, 1),
    (0, 0, 1, 1, 0, 1),
    (1, 1, 0, 0, 1, 1),
    # off the grid: tails under d_0, d_1 and d_2 (some beside grid prefixes of the same chain)
    (0,),
    (1,),
    (0, 0, 1),
    (1, 1, 0),
    (0, 0, 1, 1, 0),
]
KEYS = {p: prefix_key(list(p), BS) for p in PREFIXES}

#: A prefix: ("held", i) the i-th (mod their number) the model holds now, ("host", i) the i-th of
#: its host tier, least recent first (a host hit that reorders it), else ("any", prefix).
choices = st.one_of(
    st.tuples(st.just("held"), st.integers(0, 7)),
    st.tuples(st.just("host"), st.integers(0, 2)),
    st.tuples(st.just("any"), st.sampled_from(PREFIXES)),
)
slots = st.integers(0, 4)
inserts = st.tuples(st.just("insert"), choices, slots)
batches = st.tuples(st.just("insert_many"), st.lists(choices, min_size=1, max_size=4))
repeats = st.tuples(  # a batch that starts with a prefix held now, then others that may need its entry
    st.just("insert_many"),
    st.builds(
        lambda first, rest: [first, *rest],
        st.tuples(st.just("held"), st.integers(0, 7)),
        st.lists(choices, min_size=1, max_size=3),
    ),
)
matches = st.tuples(
    st.just("match"),
    choices,
    st.lists(st.integers(0, 1), max_size=3),  # tokens after the prefix (none: no hit on it)
    st.one_of(st.none(), st.integers(0, 7)),
    slots,
)
operations = st.lists(
    st.one_of(
        inserts,
        batches,
        matches,
        inserts,  # twice as likely as the rest: what fills the store and moves entries between tiers
        repeats,
        matches,
        st.tuples(st.just("pin"), st.integers(0, 7)),
        st.tuples(st.just("unpin"), st.integers(0, 7)),
        st.tuples(st.just("track"), choices, st.booleans()),  # reserve, fill, then publish or release
        st.tuples(st.just("reserve")),
        st.tuples(st.just("publish"), st.integers(0, 3), choices),
        st.tuples(st.just("release"), st.integers(0, 3)),
    ),
    min_size=20,  # hypothesis' lists average about 5 elements unless min_size says otherwise
    max_size=60,
)


def tag(prefix) -> tuple:
    """The state recorded for ``prefix``: bits derived from the prefix alone."""
    rng = np.random.default_rng(zlib.crc32(bytes(prefix)) + 7 * len(prefix))
    config = small_config()
    rec = rng.standard_normal((3, *config.recurrent_state_shape[1:])).astype(np.float32)
    conv = rng.standard_normal((3, *config.conv_state_shape[1:])).astype(np.float16)
    return rec, conv


class Model:
    """The contract in plain Python: prefixes in LRU order per tier, pins, reservations, counters."""

    def __init__(self, entries, host_entries):
        self.entries, self.host_entries = entries, host_entries
        self.lru = OrderedDict()  # device tier, least recent first: prefix -> instance
        self.host = OrderedDict()  # host tier, least recent first: prefix -> instance
        self.instances = itertools.count()  # a new one each time a prefix is stored in a tier
        self.pins = Counter()
        self.reserved = 0  # reservations not yet published or released
        self.stats = PrefixStats()

    def cached(self, prefix):
        return prefix in self.lru or prefix in self.host

    def instance(self, prefix):
        """Which storing of ``prefix`` the model holds now (None: not cached); a handle names one."""
        return self.lru.get(prefix, self.host.get(prefix))

    def held(self):
        return list(self.lru) + list(self.host)

    def pick(self, choice):
        how, what = choice
        pool = self.held() if how == "held" else list(self.host)
        if how != "any" and pool:
            return pool[what % len(pool)]
        return what if how == "any" else PREFIXES[what % len(PREFIXES)]

    def take(self, keep=()):
        """Whether an entry is found: a free one, else the least recent unpinned one not in ``keep``."""
        if len(self.lru) + self.reserved < self.entries:
            return True
        for prefix in self.lru:
            if not self.pins[prefix] and prefix not in keep:
                del self.lru[prefix]
                self.stats.evictions += 1
                self.offload(prefix)
                return True
        self.stats.dropped_inserts += 1
        return False

    def offload(self, prefix):
        if not self.host_entries:
            return
        if len(self.host) >= self.host_entries:
            victim = next((p for p in self.host if not self.pins[p]), None)
            if victim is None:
                return
            del self.host[victim]
        self.host[prefix] = next(self.instances)
        self.stats.offloads += 1

    def refresh(self, prefix):
        (self.lru if prefix in self.lru else self.host).move_to_end(prefix)

    def add(self, prefix):
        self.lru[prefix] = next(self.instances)
        self.stats.inserts += 1

    def insert(self, prefix):
        if self.cached(prefix):
            self.refresh(prefix)
        elif self.take():
            self.add(prefix)

    def insert_many(self, batch):
        """The instance each item's handle names (None: dropped); the batch's device entries are not evicted by it.

        A host-tier hit is pinned for the rest of the batch, so no later item's offload pushes it out:
        every handle returned is live.
        """
        keep, planned, out, held = set(), set(), [], []
        for prefix in batch:
            if prefix in planned:
                pass
            elif self.cached(prefix):
                self.refresh(prefix)
                if prefix in self.lru:
                    keep.add(prefix)
                else:
                    self.pins[prefix] += 1
                    held.append(prefix)
            elif self.take(keep):
                self.add(prefix)
                keep.add(prefix)
                planned.add(prefix)
            out.append(self.instance(prefix))
        for prefix in held:
            self.pins[prefix] -= 1
        return out

    def reserve(self):
        if not self.take():
            return False
        self.reserved += 1
        return True

    def publish(self, prefix):
        self.reserved -= 1
        if self.cached(prefix):
            self.refresh(prefix)
        else:
            self.add(prefix)

    def match(self, tokens, max_tokens):
        """The longest cached prefix of any length (grid or not) that leaves a token, within ``max_tokens``."""
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(tokens)
        n = len(tokens) - 1
        if max_tokens is not None:
            n = min(n, max_tokens)
        for k in range(n, 0, -1):
            prefix = tuple(tokens[:k])
            if self.cached(prefix):
                self.refresh(prefix)
                self.stats.hits += 1
                self.stats.hit_tokens += len(prefix)
                self.stats.host_hits += prefix in self.host
                self.stats.grid_hits += k % BS == 0
                self.stats.offgrid_hits += k % BS != 0
                return prefix
        return None


def key(prefix) -> bytes:
    return KEYS.get(prefix) or prefix_key(list(prefix), BS)


def current(store, prefix):
    """The handle naming ``prefix`` now (read from the store's bookkeeping, recency untouched)."""
    if key(prefix) in store._index:
        entry = store._index[key(prefix)]
        return PrefixHandle(entry, store._generations[entry], len(prefix))
    entry = store._hindex[key(prefix)]
    return PrefixHandle(entry, store._hgenerations[entry], len(prefix), True)


def write_slot(manager, slot, prefix):
    rec, conv = tag(prefix)
    pools = writable_pools(manager)
    pools.recurrent[:, slot] = rec
    pools.conv[:, slot] = conv


def same_state(rec, conv, prefix):
    want_rec, want_conv = tag(prefix)
    return rec.tobytes() == want_rec.tobytes() and conv.tobytes() == want_conv.tobytes()


def check(store, model, pinned):
    """The store agrees with the model after a step (see the module docstring)."""
    assert store.stats == model.stats, f"stats: {store.stats} != model {model.stats}"
    assert [store._keys[e] for e in store._lru] == [key(p) for p in model.lru], "device LRU order"
    assert [store._hkeys[h] for h in store._hlru] == [key(p) for p in model.host], "host LRU order"
    assert len(store._free) == model.entries - len(model.lru) - model.reserved, "free device entries"
    assert len(store._reserved) == model.reserved
    assert len(store._hfree) == model.host_entries - len(model.host), "free host entries"
    for tier, index, pools, view in (
        (model.lru, store._index, store.entry_pools, lambda pool, e: pool[:, e]),  # [L, P, ...]
        (model.host, store._hindex, store._host_pools, lambda pool, e: pool[e]),  # [P_host, L, ...]
    ):
        keys = {key(p): p for p in tier}
        assert set(index) == set(keys), "the cached prefixes differ from the model's"
        for k, entry in index.items():
            held = view(pools[0], entry), view(pools[1], entry)
            assert same_state(*held, keys[k]), "an entry holds a wrong state"
    for prefix, handle in pinned:  # never evicted nor moved: the pinned handle is still current
        assert model.cached(prefix) and current(store, prefix) == handle
    assert len(store) == len(model.lru) + len(model.host)
    offgrid = [p for p in (*model.lru, *model.host) if len(p) % BS]
    assert set(store._tail_of) == {key(p) for p in offgrid}, "the tail index names the off-grid prefixes held"
    counted = sum(n for lengths in store._tails.values() for _, checks in lengths for n in checks.values())
    assert counted == len(offgrid)


@given(entries=st.integers(1, 3), host_entries=st.integers(0, 3), ops=operations)
def test_store_follows_the_model(entries, host_entries, ops):
    manager = NumpyMambaCacheManager(small_config(max_intermediate_seq_len=2))
    store = PrefixStateCache(manager, entries=entries, block_size=BS, host_entries=host_entries)
    model = Model(entries, host_entries)
    pinned = []  # (prefix, handle), one per pin
    open_entries = []  # reserved entries not yet published or released
    for op in ops:
        kind = op[0]
        if kind == "insert":
            prefix, slot = model.pick(op[1]), op[2]
            write_slot(manager, slot, prefix)
            handle = store.insert(list(prefix), slot)
            model.insert(prefix)
            assert (handle is None) == (not model.cached(prefix))
            if handle is not None:
                assert handle == current(store, prefix)
        elif kind == "insert_many":
            batch = [model.pick(c) for c in op[1]]
            for slot, prefix in enumerate(batch):  # one source slot per item
                write_slot(manager, slot, prefix)
            handles = store.insert_many([list(p) for p in batch], np.arange(len(batch), dtype=np.int32))
            for prefix, want, handle in zip(batch, model.insert_many(batch), handles, strict=True):
                assert (handle is None) == (want is None), (batch, handles)
                if want is not None:  # every handle returned is live (a host hit was held for the batch)
                    assert model.instance(prefix) == want and handle == current(store, prefix), (batch, handles)
        elif kind == "match":
            seq, max_tokens, slot = list(model.pick(op[1])) + op[2], op[3], op[4]
            handle = store.match(seq, max_tokens)
            want = model.match(seq, max_tokens)
            assert (None if handle is None else handle.length) == (None if want is None else len(want))
            if handle is not None:
                assert handle == current(store, want)
                store.restore(handle, slot)
                assert same_state(manager.pools.recurrent[:, slot], manager.pools.conv[:, slot], want)
        elif kind == "pin" and model.held():
            prefix = model.held()[op[1] % len(model.held())]
            handle = current(store, prefix)
            store.pin(handle)
            model.pins[prefix] += 1
            pinned.append((prefix, handle))
        elif kind == "unpin" and pinned:
            prefix, handle = pinned.pop(op[1] % len(pinned))
            store.unpin(handle)
            model.pins[prefix] -= 1
        elif kind in ("track", "reserve"):
            entry = store.reserve()
            assert (entry is not None) == model.reserve()
            if entry is None:
                continue
            if kind == "reserve":
                open_entries.append(entry)
                continue
            prefix, reached = model.pick(op[1]), op[2]
            if reached:
                publish(store, model, entry, prefix)
            else:
                store.release(entry)
                model.reserved -= 1
        elif kind == "publish" and open_entries:
            publish(store, model, open_entries.pop(op[1] % len(open_entries)), model.pick(op[2]))
        elif kind == "release" and open_entries:
            store.release(open_entries.pop(op[1] % len(open_entries)))
            model.reserved -= 1
        check(store, model, pinned)


def publish(store, model, entry, prefix):
    """What a tracking commit writes (the state after the prefix), then publish."""
    rec, conv = tag(prefix)
    store.entry_pools[0][:, entry] = rec
    store.entry_pools[1][:, entry] = conv
    handle = store.publish(entry, list(prefix))
    model.publish(prefix)
    assert handle == current(store, prefix)
