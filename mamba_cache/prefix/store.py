"""The prefix-state store: checkpoints of recurrent state for shared prompt prefixes.

Attention KV can be reused for any prefix of a cached prompt, but a recurrent state exists only for
the exact prefix it was computed after. The store therefore keeps whole-slot checkpoints (the
recurrent and conv state of every layer) taken after chosen prefixes (block boundaries by default,
any length a placement names), keyed by the block-digest chain of
[`mamba_cache.prefix.keys`][mamba_cache.prefix.keys] and, off the block grid, a tail digest. Which
positions to checkpoint is the placement's answer (`mamba_cache.prefix.placement`), which entries
to keep the policy's (`mamba_cache.prefix.policy`); lookups live in `mamba_cache.prefix.index`.

Storage: ``P`` entries allocated once, one allocation per state kind, in the main pools' dtypes
and layouts, on the manager's backend and device:

```text
entries recurrent  [L, P, H, D, N]      (main pool: [L, B, H, D, N])
entries conv       [L, P, C, K]         (main pool: [L, B, C, K])
host tier          [P_host, L, H, D, N] and [P_host, L, C, K]  (one host entry dense)
```

Everything here is host bookkeeping written once for both backends (keys, recency, pins,
generations, statistics); the copies between entries and slots are the manager's one-launch row
copy (``_copy_rows``), which each backend binds. Bookkeeping and argument checks happen before
any copy is queued, and a refused call changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from .._config import ConfigError, format_bytes
from ..core.backend import EntryStore
from ..core.checks import INT32_MAX, check_index, check_int32_array, check_size, pad_slot_id
from ..core.manager import MambaCacheManagerBase
from .index import KeyIndex, PrefixHandle
from .keys import digest_chain, root_digest, tail_digest, token_array
from .placement import RadixView, make_placement
from .policy import EntryFacts, Policy, make_policy
from .stats import BlockSizeGuard, PrefixStats
from .tracking import TrackedEntries, on_manager_device

__all__ = ["PrefixHandle", "PrefixStateCache", "PrefixStats"]


class PrefixStateCache(TrackedEntries, KeyIndex, EntryStore):
    """``P`` checkpoints of whole-slot recurrent + conv state, keyed by token prefixes of any length.

    Args:
        manager: the Numpy- or NumbaMambaCacheManager whose slots are checkpointed (build the store
            after any ``move()``; it keeps this manager).
        entries: ``P`` >= 1, device entries (each one slot of every layer, both kinds).
        block_size: ``bs``, tokens per block of the key chain; checkpoints may sit at any length
            (off-grid ones are keyed by a tail digest). Must be ``>= S`` (``max_intermediate_seq_len``)
            so at most one boundary falls inside a verify window.
        namespace: separates models / adapters whose states differ for the same tokens.
        host_entries: ``P_host`` >= 0, entries of the host tier (page-locked host memory on the
            Numba backend): device evictions move there (its own LRU) instead of vanishing, and a
            hit there is restored straight into the live slot with a host-to-device copy.
        stream: the stream the entries are zeroed on (ignored by the NumPy backend).
        placement: which positions [`positions`][mamba_cache.prefix.PrefixStateCache.positions]
            names for a request: a name of `mamba_cache.prefix.placement` (``every_block``, the
            default; ``end_of_prompt``, ``end_of_request``, ``branch_point``, ``before_end:N``;
            ``+`` joins several) or a ``Placement``.
        policy: what is kept: ``lru`` (the default), ``flop_aware``, ``seglen`` (see
            `mamba_cache.prefix.policy`) or a ``Policy``.

    Raises:
        TypeError: ``manager`` is not a cache manager, or an argument has the wrong type.
        ValueError: ``manager`` is closed or has no layers, or ``entries`` < 1.
        ConfigError: ``block_size`` < 1 or < ``max_intermediate_seq_len``.

    Streams: every copy is queued on the ``stream`` of the call that makes it. Device entries
    follow stream order (pin a handle whose entry a restore on another stream still reads). The
    host tier orders its copies with events: an offload waits for the last write into its
    device entry (an insert or a tracking commit on any stream) and for any pending restore
    still reading its host entry; a host restore waits for the offload that filled its entry.

    Example:
        >>> import numpy as np
        >>> from mamba_cache import Config, NumpyMambaCacheManager
        >>> from mamba_cache.prefix import PrefixStateCache
        >>> cfg = Config(num_recurrent_layers=2, max_batch_size=2, recurrent_state_num_heads=2,
        ...              recurrent_state_head_dim=4, recurrent_state_size=8, conv_dim=24, conv_kernel=4)
        >>> cache = NumpyMambaCacheManager(cfg)
        >>> store = PrefixStateCache(cache, entries=4, block_size=8)
        >>> prompt = np.arange(20)
        >>> _ = store.insert(prompt[:16], slot=0)   # slot 0 holds the state after 16 tokens
        >>> handle = store.match(prompt)
        >>> handle.length
        16
        >>> store.restore(handle, slot=1)            # slot 1 now continues from token 16
    """

    @on_manager_device
    def __init__(
        self,
        manager: MambaCacheManagerBase,
        entries: int,
        block_size: int,
        namespace: str = "",
        host_entries: int = 0,
        stream: Any = None,
        placement: Any = "every_block",
        policy: Any = "lru",
    ) -> None:
        if not isinstance(manager, MambaCacheManagerBase):
            raise TypeError(f"manager must be a mamba_cache cache manager, got {type(manager).__name__}")
        manager._check_open("PrefixStateCache")
        if manager._pools is None:
            raise ValueError("PrefixStateCache: manager has no recurrent layers (num_recurrent_layers == 0)")
        entries = check_size("entries", entries, 1, INT32_MAX)
        if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)):
            raise TypeError(f"block_size must be an integer, got {type(block_size).__name__}")
        config = manager.get_config()
        low = max(1, config.max_intermediate_seq_len)
        if block_size < low:
            raise ConfigError(
                f"block_size must be >= max(1, max_intermediate_seq_len) = {low} (at most one checkpoint "
                f"boundary per verify window), got {block_size}"
            )
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        host_entries = check_size("host_entries", host_entries, 0, INT32_MAX)
        placement, policy = make_placement(placement), make_policy(policy)
        resolved = manager._stream(stream)
        # an entry is one slot of every pool a slot's state lives in (an 8-bit cache's scales and residuals too)
        pools = manager._moving_pools()
        self._pools = tuple(
            manager._zeros((config.num_recurrent_layers, entries, *pool.shape[2:]), pool.dtype, resolved)
            for pool in pools
        )
        self._host_pools = tuple(  # [P_host, L, ...]: one host entry is dense (one 2-D copy per kind)
            manager._host_zeros((host_entries, config.num_recurrent_layers, *pool.shape[2:]), pool.dtype)
            for pool in pools
            if host_entries
        )
        self.manager = manager
        self.entries = entries
        self.block_size = int(block_size)
        self.namespace = namespace
        self._root = root_digest(namespace)  # d_0, hashed once
        self.host_entries = host_entries
        self.stats = PrefixStats()
        self.placement: Any = placement
        self.policy: Policy = policy
        grid_only = placement.name == "every_block"
        self._guard = BlockSizeGuard(self.block_size) if grid_only else None
        radix = placement.uses_radix or policy.needs_sharing
        self._radix = RadixView(self.block_size) if radix else None
        self._facts = EntryFacts(entries)
        self._clock = 0
        self._parent = [-1] * entries  # seglen: the nearest cached ancestor entry on the device
        self._children: dict[int, set] = {}
        # off-grid keys: block digest d_q -> ((tail bytes 4 r, {check of the tail: entries (either tier)}), ...),
        # longest first; the check, a 64-bit hash of the tail's bytes, spares match the digest of a tail that differs
        self._tails: dict[bytes, tuple[tuple[int, dict[int, int]], ...]] = {}
        self._tail_of: dict[bytes, tuple[bytes, int, int]] = {}
        self._closed = False
        self._keys: list[bytes | None] = [None] * entries
        self._kinds: list[str | None] = [None] * entries  # the kind each entry was inserted as
        self._lengths = [0] * entries
        self._generations = [0] * entries
        self._pins = [0] * entries
        self._reserved: set[int] = set()
        self._index: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # published entries, least recent first
        self._free = list(range(entries - 1, -1, -1))  # pop() hands out entry 0 first
        # the host tier: the same bookkeeping, and events that order its copies across streams
        self._hkeys: list[bytes | None] = [None] * host_entries
        self._hlengths = [0] * host_entries
        self._hgenerations = [0] * host_entries
        self._hpins = [0] * host_entries
        self._hindex: dict[bytes, int] = {}
        self._hlru: OrderedDict[int, None] = OrderedDict()
        self._hfree = list(range(host_entries - 1, -1, -1))
        self._written: list = [None] * entries if host_entries else []  # after the last write into a device entry
        self._tracked = None  # after the last tracking commit (which entries it wrote is on the device)
        self._filled: list = [None] * host_entries  # after the offload that filled a host entry
        self._read: list = [None] * host_entries  # after the last restore that read a host entry
        self._staged: tuple | None = None  # restore_many: (stream, entries) in the staging buffer, its arg

    # ------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        """Bytes of the device entries (both kinds, all layers)."""
        return sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in self._pools) if not self._closed else 0

    @property
    def host_nbytes(self) -> int:
        """Bytes of the host tier (both kinds, all layers)."""
        return sum(p.nbytes for p in self._host_pools) if not self._closed else 0

    def __len__(self) -> int:
        """Entries (device and host tier) that hold a published checkpoint."""
        return len(self._index) + len(self._hindex)

    def __repr__(self) -> str:
        if self._closed:
            return "PrefixStateCache(closed)"
        return (
            f"PrefixStateCache(entries={self.entries}, block_size={self.block_size}, used={len(self)}, "
            f"{format_bytes(self.nbytes)})"
        )

    @on_manager_device
    def entry_state(self, entry: int) -> tuple[Any, Any]:
        """Views of one entry: (recurrent ``[L, H, D, N]``, conv ``[L, C, K]``), the backend's arrays."""
        self._check_open("entry_state")
        entry = check_index("entry", entry, self.entries)
        return self._pools[0][:, entry], self._pools[1][:, entry]

    # ------------------------------------------------------------ checks
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ValueError(f"{what}: this PrefixStateCache was closed")
        self.manager._check_open(what)

    @property
    def entry_pools(self) -> tuple:
        """The entries: recurrent ``[L, P, H, D, N]`` and conv ``[L, P, C, K]``, in the main pools' dtypes.

        The live device (NumPy: host) arrays a tracking commit writes into; ``()`` once closed.
        """
        return self._pools

    def _prefix(self, name: str, tokens: Any) -> tuple[np.ndarray, bytes, tuple | None]:
        """Check a prefix of any length >= 1; return (int32 tokens, its key, ``(d_q, r, check)`` if off the grid)."""
        data = token_array(name, tokens)
        count = data.shape[0]
        if count == 0:
            raise ValueError(
                f"{name} must hold at least 1 token (a checkpoint after n >= 1 tokens), got 0; nothing was changed"
            )
        whole, rest = divmod(count, self.block_size)
        chain = digest_chain(data, self.block_size, self._root, whole)
        base = chain[-1] if chain else self._root
        if not rest:
            return data, base, None
        piece = data[whole * self.block_size :]
        return data, tail_digest(base, piece), (base, rest, hash(piece.tobytes()))

    def _check_handle(self, name: str, handle: Any) -> int:
        if not isinstance(handle, PrefixHandle):
            raise TypeError(f"{name} must be a PrefixHandle (from match or insert), got {type(handle).__name__}")
        if handle.host:
            keys, generations, count = self._hkeys, self._hgenerations, self.host_entries
        else:
            keys, generations, count = self._keys, self._generations, self.entries
        entry = check_index(f"{name}.entry", handle.entry, count)
        if keys[entry] is None or generations[entry] != handle.generation:
            raise LookupError(
                f"{name} is stale: entry {entry} was evicted or reused since the match (generation "
                f"{handle.generation}, now {generations[entry]}); pin entries you hold across inserts"
            )
        return entry

    # ------------------------------------------------------------ bookkeeping
    def _handle(self, entry: int) -> PrefixHandle:
        return PrefixHandle(entry, self._generations[entry], self._lengths[entry])

    def _take_entry(self, stream: Any, keep: set | frozenset = frozenset(), data: Any = None) -> int | None:
        """A free entry, else the policy's victim among the unpinned published ones (evicted), else None.

        ``data``: the tokens of the checkpoint the entry is for (None: not known yet, a reservation);
        a policy that ``drops_superseded`` then takes the entry it supersedes (``_superseded``).
        """
        if self._free:
            return self._free.pop()
        pins = self._pins
        entry = None if data is None else self._superseded(data, keep)
        if entry is not None:
            self._evict(entry, stream)
            return entry
        candidates = (e for e in self._lru if not pins[e] and e not in keep)  # least recent first
        entry = self.policy.victim(candidates, self._facts)
        if entry is not None:
            self._evict(entry, stream)
        return entry

    def _evict(self, entry: int, stream: Any) -> None:
        key = self._keys[entry]
        if not (self.host_entries and self._offload(entry, stream)):
            self._forget_key(key)
        del self._index[key]
        del self._lru[entry]
        self._unlink(entry)
        self._keys[entry] = None
        self._lengths[entry] = 0
        self._kinds[entry] = None
        self._facts.lengths[entry] = 0
        self._generations[entry] += 1
        self.stats.evictions += 1

    def _offload(self, entry: int, stream: Any) -> bool:
        """Copy an evicted device entry into the host tier (its LRU choosing the host entry); False if dropped."""
        host = self._hfree.pop() if self._hfree else None
        if host is None:
            for candidate in self._hlru:
                if not self._hpins[candidate]:
                    host = candidate
                    self._hdrop(host)
                    break
        if host is None:
            return False  # every host entry pinned: the checkpoint is dropped
        manager = self.manager
        for event in (self._written[entry], self._tracked, self._read[host]):
            if event is not None:  # the fill of the device entry; a restore still reading the host entry
                manager._wait_event(event, stream)
        manager._entry_to_host(self._pools, entry, self._host_pools, host, stream)
        self._filled[host] = self._recorded(self._filled[host], stream)
        key = self._keys[entry]
        self._hkeys[host] = key
        self._hlengths[host] = self._lengths[entry]
        self._hgenerations[host] += 1
        self._hindex[key] = host
        self._hlru[host] = None
        self.stats.offloads += 1
        return True

    def _hdrop(self, host: int) -> None:
        key = self._hkeys[host]
        self._forget_key(key)
        del self._hindex[key]
        del self._hlru[host]
        self._hkeys[host] = None
        self._hlengths[host] = 0
        self._hgenerations[host] += 1

    def _recorded(self, event: Any, stream: Any) -> Any:
        """``event`` (made on first use) recorded on ``stream``."""
        if event is None:
            event = self.manager._new_event()
        self.manager._record_event(event, stream)
        return event

    def _wrote(self, entries: list, stream: Any) -> None:
        """Note device writes into ``entries`` queued on ``stream`` (host tier only)."""
        if self.host_entries and entries:
            event = self._recorded(None, stream)
            for entry in entries:
                self._written[entry] = event

    def _main(self) -> tuple:
        return self.manager._moving_pools()

    @on_manager_device
    def restore(self, handle: PrefixHandle, slot: int, stream: Any = None) -> None:
        """Copy a matched entry into live slot ``slot`` (every layer, both kinds), one launch.

        In checkpoint mode the entry becomes the slot's checkpoint: ``p0 = handle.length``, ``h = 0``.

        Args:
            handle: from [`match`][mamba_cache.prefix.PrefixStateCache.match] (or
                [`insert`][mamba_cache.prefix.PrefixStateCache.insert] /
                [`publish`][mamba_cache.prefix.PrefixStateCache.publish]).
            slot: in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).

        Raises:
            LookupError: the handle's entry was evicted or reused since (nothing changed).
            IndexError / TypeError: ``slot`` or the handle's entry out of range / not an integer.
        """
        self._check_open("restore")
        resolved = self.manager._stream(stream)
        entry = self._check_handle("handle", handle)
        slot = check_index("slot", slot, self.manager.get_config().max_batch_size)
        if not handle.host:
            self.manager._copy_rows(self._main(), self._pools, entry, slot, 1, resolved)
        else:  # a host-tier hit: straight into the live slot (no promotion), after the offload that filled it
            if self._filled[entry] is not None:
                self.manager._wait_event(self._filled[entry], resolved)
            self.manager._host_to_rows(self._host_pools, entry, self._main(), slot, resolved)
            self._read[entry] = self._recorded(self._read[entry], resolved)
        self.manager._positions_restored(slot, [handle.length], resolved)  # checkpoint mode: p0, h = 0

    @on_manager_device
    def restore_many(self, handles: Any, slots: Any, stream: Any = None) -> None:
        """Restore ``handles[i]`` into slot ``slots[i]`` for every ``i``, in one launch.

        In checkpoint mode each slot's ``p0`` becomes its handle's length and ``h = 0`` (one more launch).

        Args:
            handles: a list of ``n`` [`PrefixHandle`][mamba_cache.prefix.PrefixHandle] (an entry may appear more than
                once).
            slots: ``[n]`` int32 destination slots, distinct (NumPy backend: a host array; Numba:
                device or host). A slot outside ``[0, B)`` is skipped (padding).
            stream: the stream to copy on (ignored by the NumPy backend).

        Raises:
            LookupError: a handle is stale (nothing changed).
            TypeError / ValueError: a bad handle or ``slots`` array, lengths differ, or (NumPy
                reference) a slot repeats.

        Host time and graphs: the entry list is staged into a device buffer of this store's own
        (Numba: one host-to-device copy) only when it differs from the previous call's on the same
        stream; a repeated list costs no copy. So with ``slots`` on the device, a call repeating
        the previous list can be captured into a CUDA graph, and the replay re-reads that buffer:
        it restores the entries of this store's latest ``restore_many`` at replay time.
        """
        self._check_open("restore_many")
        manager = self.manager
        resolved = manager._stream(stream)
        if isinstance(handles, PrefixHandle) or not isinstance(handles, (list, tuple)):
            raise TypeError(f"handles must be a list of PrefixHandle, got {type(handles).__name__}")
        dst, (count,) = manager._int32_array("slots", slots, "[n]", resolved)
        if count != len(handles):
            raise ValueError(f"slots must have one slot per handle ({len(handles)}), got {count}")
        keys, generations, stop = self._keys, self._generations, self.entries
        entries = []
        for h in handles:  # the common case checked inline; anything else goes through the full checks
            e = h.entry if type(h) is PrefixHandle else None
            if type(e) is not int or not 0 <= e < stop or h.host or keys[e] is None or generations[e] != h.generation:
                entries = self._checked_entries(handles)
                break
            entries.append(e)
        if not count:
            return
        key = (getattr(resolved, "handle", None), tuple(entries))
        if self._staged is None or self._staged[0] != key:
            # staged once per distinct entry list (and stream): a repeated list (a decode loop, a
            # graph replay) re-reads the store's own staging buffer with no host-to-device copy
            src, _ = manager._int32_array(self._staging_name, np.array(entries, dtype=np.int32), "[n]", resolved)
            self._staged = (key, src)
        manager._copy_rows(self._main(), self._pools, self._staged[1], dst, count, resolved)
        manager._positions_restored(dst, [h.length for h in handles], resolved)  # checkpoint mode: p0, h = 0

    def _checked_entries(self, handles: list) -> list:
        """The entries of ``handles``, each checked (raises naming the first bad one; nothing changed)."""
        entries = [self._check_handle(f"handles[{i}]", h) for i, h in enumerate(handles)]
        for i, h in enumerate(handles):
            if h.host:
                raise ValueError(f"handles[{i}] is in the host tier: restore it with restore(); nothing was changed")
        return entries

    @property
    def _staging_name(self) -> str:
        return f"prefix_entries_{id(self)}"  # this store's own staging buffer in the manager

    # ------------------------------------------------------------ insert
    @on_manager_device
    def insert(self, tokens: Any, slot: int, stream: Any = None, kind: str | None = None) -> PrefixHandle | None:
        """Record live slot ``slot``'s current state as the state after ``tokens``.

        In checkpoint mode the current state is the slot's checkpoint advanced through its ``h`` ring
        steps (the fold's arithmetic), computed into the entry; the slot and its ring are unchanged.

        Already present: refresh its recency, copy nothing. Otherwise the policy may refuse it
        (counted in ``stats.rejected_inserts``); else take a free entry or evict the policy's victim
        among the unpinned ones; if every entry is pinned the insert is dropped (counted in
        ``stats.dropped_inserts``), never an error.

        Args:
            tokens: ``[n]`` host integer token ids, ``n >= 1`` (on the block grid or off it): the
                prefix the slot has consumed.
            slot: in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).
            kind: why the checkpoint is taken (a [`Checkpoint`][mamba_cache.prefix.placement.Checkpoint]'s
                kind from [`positions`][mamba_cache.prefix.PrefixStateCache.positions]); the policy's
                admission reads it. ``None``: the caller's own choice (every policy admits it).

        Returns:
            The entry's handle, or ``None`` when dropped or not admitted.

        Raises:
            ValueError: ``tokens`` is empty.
            IndexError / TypeError: ``slot`` out of range / not an integer; bad ``tokens``.
        """
        self._check_open("insert")
        resolved = self.manager._stream(stream)
        data, key, tail = self._prefix("tokens", tokens)
        slot = check_index("slot", slot, self.manager.get_config().max_batch_size)
        if kind is not None and not isinstance(kind, str):
            raise TypeError(f"kind must be a str or None, got {type(kind).__name__}")
        present = self._lookup(key)
        if present is not None:
            return present
        if not self._admit(data, kind):
            return None
        entry = self._take_entry(resolved, data=data)
        if entry is None:
            self.stats.dropped_inserts += 1
            return None
        try:
            self.manager._copy_current(self._pools, slot, entry, 1, resolved)
        except BaseException:
            self._free.append(entry)
            raise
        self._wrote([entry], resolved)
        return self._publish(entry, key, data, tail, kind)

    @on_manager_device
    def insert_many(self, tokens: Any, slots: Any, stream: Any = None) -> list:
        """`insert` for ``n`` (prefix, slot) pairs, the copies in one launch.

        Args:
            tokens: a list of ``n`` token sequences, each of length >= 1.
            slots: ``[n]`` int32 host array of the source slots, each in ``[0, B)`` (both backends:
                the store must know every slot is valid before it keys an entry), or ``pad_slot_id``
                (-1) for a padding row, which reads nothing and gets the handle ``None``.
            stream: the stream to copy on (ignored by the NumPy backend).

        Returns:
            ``n`` handles (``None`` for dropped inserts and padding rows). A prefix given twice is copied once;
            a prefix already present (either tier) is never evicted or dropped by the batch's own
            inserts, so every handle returned is live.

        Raises:
            TypeError / ValueError / IndexError: as [`insert`][mamba_cache.prefix.PrefixStateCache.insert], for any
                element (nothing changed).
        """
        self._check_open("insert_many")
        manager = self.manager
        resolved = manager._stream(stream)
        if not isinstance(tokens, (list, tuple)):
            raise TypeError(f"tokens must be a list of token sequences, got {type(tokens).__name__}")
        if not isinstance(slots, np.ndarray):
            kind = "a device array" if hasattr(slots, "__cuda_array_interface__") else type(slots).__name__
            raise TypeError(f"slots must be a host numpy.ndarray of int32 (on both backends), got {kind}")
        check_int32_array("slots", slots.dtype, slots.shape, slots.flags.c_contiguous, "[n]")
        if slots.shape[0] != len(tokens):
            raise ValueError(f"slots must have one slot per prefix ({len(tokens)}), got {slots.shape[0]}")
        batch = manager.get_config().max_batch_size
        for i, slot in enumerate(slots.tolist()):
            if slot != pad_slot_id:
                check_index(f"slots[{i}]", slot, batch)
        prefixes = [self._prefix(f"tokens[{i}]", t) for i, t in enumerate(tokens)]
        handles: list = [None] * len(prefixes)
        src, dst, taken, planned, held = [], [], set(), {}, []
        try:
            for i, (data, key, tail) in enumerate(prefixes):
                if slots[i] == pad_slot_id:  # padding: reads nothing, keys nothing
                    continue
                if key in planned:
                    handles[i] = planned[key]
                    continue
                present = self._lookup(key)
                if present is not None:
                    if present.host:  # pinned for the batch: an offload of a later eviction must not drop it
                        self._hpins[present.entry] += 1
                        held.append(present.entry)
                    else:
                        taken.add(present.entry)
                    handles[i] = present
                    continue
                entry = self._take_entry(resolved, keep=taken, data=data)
                if entry is None:
                    self.stats.dropped_inserts += 1
                    continue
                taken.add(entry)
                planned[key] = entry
                src.append(int(slots[i]))
                dst.append(entry)
                self._publish(entry, key, data, tail)
                handles[i] = entry
        finally:
            for host in held:
                self._hpins[host] -= 1
        if src:
            src_arg, _ = manager._int32_array("slots", np.array(src, dtype=np.int32), "[n]", resolved)
            dst_arg, _ = manager._int32_array("prefix_entries", np.array(dst, dtype=np.int32), "[n]", resolved)
            manager._copy_current(self._pools, src_arg, dst_arg, len(src), resolved)
            self._wrote(dst, resolved)
        return [h if h is None or isinstance(h, PrefixHandle) else self._handle(h) for h in handles]

    # ------------------------------------------------------------ pins
    def pin(self, handle: PrefixHandle) -> None:
        """Protect a handle's entry from eviction (counted: unpin as often as pinned).

        Raises:
            LookupError: the handle is stale. TypeError / IndexError: not a handle.
        """
        self._check_open("pin")
        entry = self._check_handle("handle", handle)
        (self._hpins if handle.host else self._pins)[entry] += 1

    def unpin(self, handle: PrefixHandle) -> None:
        """Undo one `pin`.

        Raises:
            ValueError: the entry is not pinned. LookupError: the handle is stale.
        """
        self._check_open("unpin")
        entry = self._check_handle("handle", handle)
        pins = self._hpins if handle.host else self._pins
        if not pins[entry]:
            raise ValueError(f"handle: entry {entry} is not pinned; nothing was changed")
        pins[entry] -= 1

    def is_pinned(self, entry: int) -> bool:
        """Whether ``entry`` is pinned or reserved (so never evicted)."""
        entry = check_index("entry", entry, self.entries)
        return bool(self._pins[entry]) or entry in self._reserved

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the entries and the manager's launches bound to them. Idempotent."""
        if self._closed:
            return
        self.manager._forget((*self._pools, *self._host_pools), self._staging_name)  # entry and host-tier copies
        self._staged = None
        self._pools = ()
        self._host_pools = ()
        self._closed = True

    def __enter__(self) -> PrefixStateCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
