"""Moving states: export / import of state parcels, and preemption (offload / resume) into host memory.

A mixin of [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase] (documented there). The
layout, the descriptor and every check are backend-neutral (`mamba_cache.moving.parcel`); a
backend binds four hooks: a zeroed byte buffer (``_parcel_buffer``), an incoming buffer checked and
staged on its device (``_parcel_buffer_in``), the byte-run copy between pools and a buffer
(``_copy_runs``) and the chunk checksums (``_chunk_checksums``). Preemption uses the prefix store's
host-tier hooks (``_host_zeros``, ``_entry_to_host``, ``_host_to_rows``, events) on a host pool of
the manager's own.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..moving.parcel import (
    CHUNK_BYTES,
    VERSION,
    ParcelDescriptor,
    ParcelError,
    StateParcel,
    buffer_bytes,
    checksum_digest,
    fingerprint,
    layout,
    runs,
)
from .checks import check_index, check_int32_array, check_size, pad_slot_id


class OffloadHandle(NamedTuple):
    """A slot's state parked in the manager's host pool by ``offload_slots``; ``resume`` uses it once.

    Attributes:
        entry: the host pool entry.
        generation: the entry's generation when it was filled (a used handle is stale).
        position: the tokens the state had consumed (checkpoint mode: ``p0 + h``), or ``None``.
    """

    entry: int
    generation: int
    position: int | None


class _OffloadPool:
    """The manager's own host pool: ``[P, L, ...]`` per state kind, its free list, generations and events."""

    def __init__(self, manager: Any, capacity: int) -> None:
        pools = manager._moving_pools()  # an 8-bit cache's scales and residual park with the states
        self.host = tuple(manager._host_zeros((capacity, *p.shape[:1], *p.shape[2:]), p.dtype) for p in pools)
        self.capacity = capacity
        self.free = list(range(capacity - 1, -1, -1))
        self.generations = [0] * capacity
        self.filled: list = [None] * capacity  # event after the offload that filled an entry
        self.read: list = [None] * capacity  # event after the resume that read it


class MovingOperations:
    """``export_slots`` / ``import_slots`` (state parcels) and ``offload_slots`` / ``resume`` (preemption)."""

    # ------------------------------------------------------------ arguments
    def _refuse_8bit(self, what: str, reason: str) -> None:
        """Refuse ``what`` on a cache with 8-bit states, before anything is read or written."""
        kinds = self._config.quantised_kinds
        if kinds:
            raise ValueError(
                f"{what}: not built for 8-bit states ({', '.join(kinds)} with scales): {reason}; nothing changed"
            )

    def _host_slots(self, what: str, slots: Any, *, distinct: bool) -> np.ndarray:
        """A host int32 ``[n]`` slot array: each in ``[0, B)`` or ``pad_slot_id``; int64 copy returned."""
        if not isinstance(slots, np.ndarray):
            kind = "a device array" if hasattr(slots, "__cuda_array_interface__") else type(slots).__name__
            raise TypeError(f"{what}: slots must be a host numpy.ndarray of int32 (on both backends), got {kind}")
        check_int32_array("slots", slots.dtype, slots.shape, slots.flags.c_contiguous, "[n]")
        values = slots.astype(np.int64)
        batch = self._config.max_batch_size
        bad = (values != pad_slot_id) & ((values < 0) | (values >= batch))
        if bad.any():
            raise IndexError(
                f"{what}: slots must be in [0, {batch}) or pad_slot_id (-1), got {int(values[bad][0])}; nothing changed"
            )
        live = values[values != pad_slot_id]
        if distinct and np.unique(live).size != live.size:
            raise ValueError(f"{what}: slots must be distinct, got {values.tolist()}; nothing changed")
        return values

    # ------------------------------------------------------------ export
    def export_slots(
        self,
        slots: Any,
        stream: Any = None,
        *,
        positions: Any = None,
        keys: Any = None,
        namespace: str = "",
        dest_tp_size: int | None = None,
    ) -> StateParcel:
        """Pack the current state of some slots into a parcel for a cache of ``dest_tp_size`` ranks.

        One piece per destination rank whose heads overlap this rank's (``Config.tp_rank`` of
        ``Config.tp_size``): a contiguous uint8 buffer on this backend's device, and its descriptor
        (the model's fingerprint, the namespace, both ranks, per slot the position and prefix key,
        the parts, and an Adler-32 checksum per 1 MiB chunk computed on the device). The recurrent
        state splits by heads, the conv state by its sections (``Config.conv_sections``). In
        checkpoint mode each slot's folded state (after ``p0 + h`` tokens) goes into the parcel;
        the slots' checkpoints and rings are untouched. Nothing here changes any slot.

        Args:
            slots: ``[n]`` int32 host ``numpy.ndarray``, each in ``[0, B)``; ``pad_slot_id`` rows
                read nothing (their buffer rows stay zero, the descriptor lists them in ``pad_rows``
                and an import skips them).
            stream: the stream to run on (ignored by the NumPy backend).
            positions: optional ``[n]`` int64 host array, the tokens each slot's state has consumed
                (keyword only); in checkpoint mode the default is each slot's ``p0 + h``.
            keys: optional list of ``n`` prefix keys (``bytes`` of the store's 16-byte digests, or
                ``None`` per slot) (keyword only).
            namespace: the model / adapter namespace; an import must name the same (keyword only).
            dest_tp_size: the destination's TP size (keyword only; default: this cache's).

        Returns:
            The [`StateParcel`][mamba_cache.moving.parcel.StateParcel].

        Raises:
            TypeError / IndexError / ValueError: a bad argument (named), nothing changed.
            ValueError: a cache with 8-bit states (a parcel has no place for their scales).
            ParcelError: ``dest_tp_size`` cannot split this model's heads or groups.
        """
        self._require_pools("export_slots")
        self._refuse_8bit("export_slots", "a parcel's layout has no place for their scales")
        resolved = self._stream(stream)
        config = self._config
        rows = self._host_slots("export_slots", slots, distinct=False)
        count = rows.size
        position_values = self._parcel_positions(positions, count)
        key_values = _parcel_keys(keys, count)
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        dest = config.tp_size if dest_tp_size is None else check_size("dest_tp_size", dest_tp_size, 1, 2**31 - 1)
        source = (config.tp_rank, config.tp_size)
        plans = [(j, layout(config, source, (j, dest), count)) for j in range(dest)]
        # (pools [L, slots, ...] on this backend's device, buffer row -> pool slot) of each copy into a buffer
        sources = [((self._pools.recurrent, self._pools.conv), rows, config.max_batch_size)]
        if self._history:  # checkpoint mode: each slot folded into a [L, 1, ...] pair of its own, the ring untouched
            if position_values is None:
                lengths, starts = self.history_lengths(stream), self.checkpoint_positions(stream)
                position_values = [None if r < 0 else int(starts[r] + lengths[r]) for r in rows]
            sources = [
                (self._folded(int(r), resolved), np.where(np.arange(count) == i, 0, pad_slot_id), 1)
                for i, r in enumerate(rows)
                if r >= 0
            ]
        pieces = []
        for j, parts in plans:
            if not parts:
                continue
            nbytes = buffer_bytes(config, parts, count)
            buffer = self._parcel_buffer(nbytes, resolved)
            for pools, pool_rows, pool_slots in sources:
                self._copy_runs(runs(config, parts, pool_rows, pool_slots), buffer, pools, True, resolved)
            checksums = tuple(int(c) for c in self._chunk_checksums(buffer, CHUNK_BYTES, resolved))
            descriptor = ParcelDescriptor(
                version=VERSION,
                fingerprint=fingerprint(config),
                namespace=namespace,
                recurrent_dtype=config.recurrent_state_dtype.name,
                conv_dtype=config.conv_state_dtype.name,
                source_rank=config.tp_rank,
                source_size=config.tp_size,
                dest_rank=j,
                dest_size=dest,
                count=count,
                pad_rows=tuple(int(r) for r in np.flatnonzero(rows < 0)),
                positions=None if position_values is None else tuple(position_values),
                keys=key_values,
                parts=tuple(parts),
                nbytes=nbytes,
                chunk_bytes=CHUNK_BYTES,
                checksums=checksums,
                digest=checksum_digest(checksums),
            )
            pieces.append((descriptor, buffer))
        return StateParcel(tuple(pieces))

    def _parcel_positions(self, positions: Any, count: int) -> list | None:
        if positions is None:
            return None
        if not isinstance(positions, np.ndarray) or positions.dtype != np.int64 or positions.shape != (count,):
            got = getattr(positions, "dtype", type(positions).__name__)
            raise TypeError(f"positions must be a host numpy.ndarray of int64 [n] = [{count}], got {got}")
        if (positions < 0).any():
            raise ValueError(f"positions must be >= 0, got {int(positions.min())}; nothing changed")
        return [int(p) for p in positions]

    # ------------------------------------------------------------ import
    def import_slots(self, parcel: StateParcel, slots: Any, stream: Any = None, *, namespace: str = "") -> None:
        """Write this rank's piece of a parcel into some slots, after checking all of it.

        The piece for this cache's rank (``Config.tp_rank``) is checked whole before any byte of a
        slot is written: the descriptor's format, the dtypes, the model's fingerprint, the
        namespace, that the source's and this cache's shards tile the same heads (the parts are
        exactly the overlap of the two shards), the buffer's length and every chunk's checksum
        (recomputed on the device) and their digest. Then one launch copies the parts into the
        slots: a piece from a source of another TP size fills the heads and conv channels the two
        shards share (import every source rank's parcel to fill a slot whole). In checkpoint mode
        the state becomes the slot's checkpoint with an empty ring (``h = 0``), ``p0`` the parcel's
        position when it carries one.

        Staging memory: none in the pools. The buffer is read where it is (the Numba backend first
        copies a host buffer to one device buffer of ``descriptor.nbytes`` bytes), plus the run
        table (32 bytes per slot, layer and part) and the checksums (4 bytes per MiB).

        Args:
            parcel: a [`StateParcel`][mamba_cache.moving.parcel.StateParcel] with a piece for this rank.
            slots: ``[n]`` int32 host ``numpy.ndarray`` (``n`` the parcel's slot count), distinct, in
                ``[0, B)``; ``pad_slot_id`` rows are skipped.
            stream: the stream to run on (ignored by the NumPy backend).
            namespace: this cache's namespace; the parcel's must equal it (keyword only).

        Raises:
            ParcelError: another model, dtype, namespace or shard layout, no piece for this rank, a
                damaged buffer or descriptor; nothing changed.
            TypeError / IndexError / ValueError: a bad ``slots`` or ``parcel`` (named); nothing changed.
            ValueError: a cache with 8-bit states (a parcel has no place for their scales).
        """
        self._require_pools("import_slots")
        self._refuse_8bit("import_slots", "a parcel's layout has no place for their scales")
        resolved = self._stream(stream)
        config = self._config
        if not isinstance(parcel, StateParcel):
            raise TypeError(f"parcel must be a mamba_cache.moving.StateParcel, got {type(parcel).__name__}")
        descriptor, buffer = parcel.piece(config.tp_rank)
        self._check_descriptor(descriptor, namespace)
        rows = self._host_slots("import_slots", slots, distinct=True)
        if rows.size != descriptor.count:
            raise ValueError(f"slots must have one slot per parcel slot ({descriptor.count}), got {rows.size}")
        staged = self._parcel_buffer_in("parcel buffer", buffer, descriptor.nbytes, resolved)
        sums = self._chunk_checksums(staged, descriptor.chunk_bytes, resolved)
        bad = np.flatnonzero(np.asarray(sums, dtype=np.int64) != np.asarray(descriptor.checksums, dtype=np.int64))
        if bad.size:
            raise ParcelError(
                f"parcel buffer: chunk {int(bad[0])} of {len(sums)} fails its checksum (the bytes were damaged on "
                "the way); nothing was changed"
            )
        rows = rows.copy()
        rows[list(descriptor.pad_rows)] = pad_slot_id  # rows the exporter read nothing into
        table = runs(config, list(descriptor.parts), rows, config.max_batch_size)
        self._copy_runs(table, staged, (self._pools.recurrent, self._pools.conv), False, resolved)
        if self._history:
            live = rows[rows >= 0]
            positions = None
            if descriptor.positions is not None:
                positions = np.array([p for p, r in zip(descriptor.positions, rows, strict=True) if r >= 0], np.int64)
            self._reset_checkpoints(live, positions, resolved)

    def _check_descriptor(self, descriptor: ParcelDescriptor, namespace: str) -> None:
        """Every check of a piece's descriptor against this cache (raises ``ParcelError`` naming the first)."""
        config = self._config
        if descriptor.version != VERSION:
            raise ParcelError(f"parcel: descriptor version {descriptor.version}, this library reads {VERSION}")
        if descriptor.dest_size != config.tp_size:
            raise ParcelError(
                f"parcel: made for a destination of TP size {descriptor.dest_size}, this cache is rank "
                f"{config.tp_rank} of {config.tp_size}; nothing was changed"
            )
        for kind, got in (("recurrent", descriptor.recurrent_dtype), ("conv", descriptor.conv_dtype)):
            want = getattr(config, f"{kind}_state_dtype").name
            if got != want:
                raise ParcelError(f"parcel: {kind} state dtype {got}, this cache keeps {want}; nothing was changed")
        if descriptor.fingerprint != fingerprint(config):
            raise ParcelError(
                "parcel: another model's states (its fingerprint of layers, heads, dims, groups, conv layout, dtypes "
                "and mixer differs from this cache's); nothing was changed"
            )
        if not isinstance(namespace, str) or descriptor.namespace != namespace:
            raise ParcelError(
                f"parcel: namespace {descriptor.namespace!r}, this import names {namespace!r}; nothing was changed"
            )
        source, dest = (descriptor.source_rank, descriptor.source_size), (config.tp_rank, config.tp_size)
        expected = tuple(layout(config, source, dest, descriptor.count))
        if tuple(descriptor.parts) != expected:
            raise ParcelError(
                f"parcel: its parts {list(descriptor.parts)} are not the overlap of source rank {source} and this "
                f"rank {dest} ({list(expected)}); nothing was changed"
            )
        if descriptor.nbytes != buffer_bytes(config, list(expected), descriptor.count):
            raise ParcelError(f"parcel: nbytes {descriptor.nbytes} does not match its parts; nothing was changed")
        chunks = math.ceil(descriptor.nbytes / descriptor.chunk_bytes) if descriptor.chunk_bytes > 0 else -1
        if len(descriptor.checksums) != chunks or checksum_digest(descriptor.checksums) != descriptor.digest:
            raise ParcelError("parcel: its chunk checksums do not match their digest; nothing was changed")
        if any(not 0 <= int(r) < descriptor.count for r in descriptor.pad_rows):
            raise ParcelError(f"parcel: pad_rows {list(descriptor.pad_rows)} outside its {descriptor.count} rows")
        for name, values in (("positions", descriptor.positions), ("keys", descriptor.keys)):
            if values is not None and len(values) != descriptor.count:
                raise ParcelError(f"parcel: {len(values)} {name} for {descriptor.count} slots; nothing was changed")

    # ------------------------------------------------------------ preemption
    def reserve_offload(self, capacity: int) -> None:
        """Allocate the host pool ``offload_slots`` parks states in: ``capacity`` slots (pinned on the Numba backend).

        Called implicitly with ``capacity = B`` by the first ``offload_slots``. This pool is the
        manager's own, never the prefix store's host tier (whose LRU could evict a parked state).

        Raises:
            ValueError: states are parked in the current pool (resume them first), or a bad capacity.
        """
        self._require_pools("reserve_offload")
        capacity = check_size("capacity", capacity, 1, 2**31 - 1)
        pool = getattr(self, "_offload", None)
        if pool is not None and len(pool.free) != pool.capacity:
            raise ValueError(f"reserve_offload: {pool.capacity - len(pool.free)} states are parked; resume them first")
        self._offload = _OffloadPool(self, capacity)

    def offload_slots(self, slots: Any, stream: Any = None) -> list:
        """Park the current state of some slots in the manager's host pool (preemption); the slots are unchanged.

        Each state is copied bit for bit (with an 8-bit cache's scales and residual; checkpoint
        mode: the folded state, the ring untouched) on ``stream`` (asynchronous into pinned memory
        on the Numba backend); the slot may be reused at once for another sequence on the same
        stream.

        Args:
            slots: ``[n]`` int32 host ``numpy.ndarray``, each in ``[0, B)``; ``pad_slot_id`` rows
                park nothing (their handle is ``None``).
            stream: the stream to copy on (ignored by the NumPy backend).

        Returns:
            ``n`` [`OffloadHandle`][mamba_cache.core.moving.OffloadHandle]s (``None`` for padding).

        Raises:
            MemoryError: the pool has fewer free entries than live rows (nothing parked).
            TypeError / IndexError / ValueError: a bad ``slots`` (named); nothing changed.
            ValueError: an 8-bit cache in checkpoint mode (its folded scales are not parked).
        """
        self._require_pools("offload_slots")
        if self._history:
            self._refuse_8bit("offload_slots", "in checkpoint mode a slot's folded scales are not parked")
        resolved = self._stream(stream)
        rows = self._host_slots("offload_slots", slots, distinct=False)
        if getattr(self, "_offload", None) is None:
            self.reserve_offload(self._config.max_batch_size)
        pool = self._offload
        live = int((rows >= 0).sum())
        if live > len(pool.free):
            raise MemoryError(
                f"offload_slots: {live} states to park but {len(pool.free)} of {pool.capacity} host entries are free "
                "(resume some, or reserve_offload a larger pool); nothing was parked"
            )
        positions = None
        if self._history:
            positions = self.checkpoint_positions(stream) + self.history_lengths(stream)
        handles: list = []
        for slot in rows.tolist():
            if slot < 0:
                handles.append(None)
                continue
            entry = pool.free.pop()
            if pool.read[entry] is not None:  # the resume that read this entry last must be done
                self._wait_event(pool.read[entry], resolved)
            if self._history:
                source, row = self._folded(slot, resolved), 0
            else:
                source, row = self._moving_pools(), slot  # with any 8-bit scales and residual
            self._entry_to_host(source, row, pool.host, entry, resolved)
            pool.filled[entry] = self._recorded(pool.filled[entry], resolved)
            position = None if positions is None else int(positions[slot])
            handles.append(OffloadHandle(entry, pool.generations[entry], position))
        return handles

    def resume(self, handle: OffloadHandle, slot: int, stream: Any = None) -> None:
        """Copy a parked state into ``slot``, bit for bit, and free its host entry (a handle is single-use).

        In checkpoint mode the state becomes the slot's checkpoint, ``h = 0``, ``p0`` the parked
        state's position.

        Raises:
            LookupError: the handle was used already (or belongs to a pool since replaced).
            IndexError / TypeError: ``slot`` out of range / not an integer; a bad handle.
        """
        self._require_pools("resume")
        resolved = self._stream(stream)
        if not isinstance(handle, OffloadHandle):
            raise TypeError(f"handle must be an OffloadHandle from offload_slots, got {type(handle).__name__}")
        slot = check_index("slot", slot, self._config.max_batch_size)
        pool = getattr(self, "_offload", None)
        entry = handle.entry
        if (
            pool is None
            or not 0 <= entry < pool.capacity
            or entry in pool.free
            or pool.generations[entry] != handle.generation
        ):
            raise LookupError(f"resume: the handle {handle} was used already (a handle is single-use); nothing changed")
        if pool.filled[entry] is not None:
            self._wait_event(pool.filled[entry], resolved)
        self._host_to_rows(pool.host, entry, self._moving_pools(), slot, resolved)
        pool.read[entry] = self._recorded(pool.read[entry], resolved)
        pool.generations[entry] += 1
        pool.free.append(entry)
        if self._history:
            position = None if handle.position is None else np.array([handle.position], np.int64)
            self._reset_checkpoints(np.array([slot]), position, resolved)

    def _recorded(self, event: Any, stream: Any) -> Any:
        """``event`` (a new one if None) recorded on ``stream``."""
        if event is None:
            event = self._new_event()
        self._record_event(event, stream)
        return event


def _parcel_keys(keys: Any, count: int) -> tuple | None:
    """Prefix keys as hex strings (``None`` per slot without one), or None."""
    if keys is None:
        return None
    if not isinstance(keys, (list, tuple)) or len(keys) != count:
        raise TypeError(f"keys must be a list of {count} prefix keys (bytes or None), got {type(keys).__name__}")
    out = []
    for i, key in enumerate(keys):
        if key is not None and not isinstance(key, (bytes, bytearray)):
            raise TypeError(f"keys[{i}] must be bytes or None, got {type(key).__name__}")
        out.append(None if key is None else bytes(key).hex())
    return tuple(out)
