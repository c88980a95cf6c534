"""Property tests of the prefix-state store against a plain Python model of its contract.

Hypothesis draws sequences of insert / match / restore / pin / unpin / reserve+publish on a tiny
store (bs = 2, binary tokens, so prefixes share blocks constantly). After every step the store must
agree with the model (which prefixes are cached, the LRU choice of victims, dropped inserts) and
keep its invariants: no pinned entry is evicted, a match is the longest cached prefix, and every
entry holds exactly the state recorded for its own prefix (never another prefix's).
"""

import zlib
from collections import Counter, OrderedDict

import numpy as np
from helpers import small_config, writable_pools
from hypothesis import given
from hypothesis import strategies as st

from mamba_cache import NumpyMambaCacheManager
from mamba_cache.prefix import PrefixHandle, PrefixStateCache, block_digests

BS = 2

tokens = st.lists(st.integers(0, 1), min_size=1, max_size=7)
prefixes = st.integers(1, 3).flatmap(lambda n: st.lists(st.integers(0, 1), min_size=BS * n, max_size=BS * n))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), prefixes, st.integers(0, 4)),
        st.tuples(st.just("match"), tokens, st.one_of(st.none(), st.integers(0, 8)), st.integers(0, 4)),
        st.tuples(st.just("pin"), st.integers(0, 10)),
        st.tuples(st.just("unpin"), st.integers(0, 10)),
        st.tuples(st.just("track"), prefixes, st.booleans()),
    ),
    max_size=40,
)


def tag(prefix) -> tuple:
    """The state recorded for ``prefix``: bits derived from the prefix alone."""
    rng = np.random.default_rng(zlib.crc32(bytes(prefix)) + 7 * len(prefix))
    config = small_config()
    rec = rng.standard_normal((3, *config.recurrent_state_shape[1:])).astype(np.float32)
    conv = rng.standard_normal((3, *config.conv_state_shape[1:])).astype(np.float16)
    return rec, conv


class Model:
    """The contract in plain Python: prefixes in LRU order per tier, pin counts, reserved entries."""

    def __init__(self, entries, host_entries):
        self.entries, self.host_entries = entries, host_entries
        self.lru = OrderedDict()  # device tier, least recent first
        self.host = OrderedDict()  # host tier, least recent first
        self.pins = Counter()
        self.reserved = 0
        self.dropped = 0

    def cached(self, prefix):
        return prefix in self.lru or prefix in self.host

    def take(self):
        if len(self.lru) + self.reserved < self.entries:
            return True
        for prefix in self.lru:
            if not self.pins[prefix]:
                del self.lru[prefix]
                self.offload(prefix)
                return True
        self.dropped += 1
        return False

    def offload(self, prefix):
        if not self.host_entries:
            return
        if len(self.host) >= self.host_entries:
            victim = next((p for p in self.host if not self.pins[p]), None)
            if victim is None:
                return
            del self.host[victim]
        self.host[prefix] = None

    def refresh(self, prefix):
        (self.lru if prefix in self.lru else self.host).move_to_end(prefix)

    def insert(self, prefix):
        if self.cached(prefix):
            self.refresh(prefix)
        elif self.take():
            self.lru[prefix] = None

    def match(self, tokens, max_tokens):
        n = max(0, (len(tokens) - 1) // BS)
        if max_tokens is not None:
            n = min(n, max_tokens // BS)
        for k in range(n, 0, -1):
            prefix = tuple(tokens[: k * BS])
            if self.cached(prefix):
                self.refresh(prefix)
                return prefix
        return None


def current(store, prefix):
    """The handle naming ``prefix`` now (read from the store's bookkeeping, recency untouched)."""
    key = block_digests(list(prefix), BS)[-1]
    if key in store._index:
        entry = store._index[key]
        return PrefixHandle(entry, store._generations[entry], len(prefix))
    entry = store._hindex[key]
    return PrefixHandle(entry, store._hgenerations[entry], len(prefix), True)


def write_slot(manager, slot, prefix):
    rec, conv = tag(prefix)
    pools = writable_pools(manager)
    pools.recurrent[:, slot] = rec
    pools.conv[:, slot] = conv


def same_state(rec, conv, prefix):
    want_rec, want_conv = tag(prefix)
    return rec.tobytes() == want_rec.tobytes() and conv.tobytes() == want_conv.tobytes()


@given(entries=st.integers(1, 4), host_entries=st.integers(0, 3), ops=operations)
def test_store_follows_the_model(entries, host_entries, ops):
    manager = NumpyMambaCacheManager(small_config(max_intermediate_seq_len=2))
    store = PrefixStateCache(manager, entries=entries, block_size=BS, host_entries=host_entries)
    model = Model(entries, host_entries)
    pinned = []  # (prefix, handle), one per pin
    host_hits = 0
    for op in ops:
        kind = op[0]
        if kind == "insert":
            prefix, slot = tuple(op[1]), op[2]
            write_slot(manager, slot, prefix)
            handle = store.insert(list(prefix), slot)
            model.insert(prefix)
            assert (handle is None) == (not model.cached(prefix))
            if handle is not None:
                assert handle == current(store, prefix)
        elif kind == "match":
            seq, max_tokens, slot = op[1], op[2], op[3]
            handle = store.match(seq, max_tokens)
            want = model.match(seq, max_tokens)
            assert (None if handle is None else handle.length) == (None if want is None else len(want))
            if handle is not None:
                assert handle == current(store, want)
                store.restore(handle, slot)
                assert same_state(manager.pools.recurrent[:, slot], manager.pools.conv[:, slot], want)
                assert store.stats.host_hits == host_hits + handle.host
                host_hits = store.stats.host_hits
        elif kind == "pin" and (model.lru or model.host):
            everything = list(model.lru) + list(model.host)
            prefix = everything[op[1] % len(everything)]
            handle = current(store, prefix)
            store.pin(handle)
            model.pins[prefix] += 1
            pinned.append((prefix, handle))
        elif kind == "unpin" and pinned:
            prefix, handle = pinned.pop(op[1] % len(pinned))
            store.unpin(handle)
            model.pins[prefix] -= 1
        elif kind == "track":
            prefix, reached = tuple(op[1]), op[2]
            entry = store.reserve()
            model_took = model.take()
            assert (entry is not None) == model_took
            if entry is None:
                continue
            model.reserved += 1
            # what a tracking commit writes: the state after the prefix
            rec, conv = tag(prefix)
            store.entry_pools[0][:, entry] = rec
            store.entry_pools[1][:, entry] = conv
            model.reserved -= 1
            if reached:
                handle = store.publish(entry, list(prefix))
                assert handle == current(store, prefix)
                if model.cached(prefix):
                    model.refresh(prefix)
                else:
                    model.lru[prefix] = None
            else:
                store.release(entry)
        # invariants
        assert store.stats.dropped_inserts == model.dropped
        for tier, index, pools, view in (
            (model.lru, store._index, store.entry_pools, lambda pool, e: pool[:, e]),  # [L, P, ...]
            (model.host, store._hindex, store._host_pools, lambda pool, e: pool[e]),  # [P_host, L, ...]
        ):
            keys = {block_digests(list(p), BS)[-1]: p for p in tier}
            assert set(index) == set(keys), "the cached prefixes differ from the model's"
            for key, entry in index.items():
                held = view(pools[0], entry), view(pools[1], entry)
                assert same_state(*held, keys[key]), "an entry holds a wrong state"
        for prefix, handle in pinned:  # never evicted nor moved: the pinned handle is still current
            assert model.cached(prefix) and current(store, prefix) == handle
        assert len(store) <= entries + host_entries
