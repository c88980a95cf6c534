"""The NumPy reference backend: the executable definition of the cache semantics.

Every operation is a few vectorised NumPy statements over the stacked pools (``[L, B, ...]``),
so the whole contract reads in one sitting. The Numba backend must match it bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..moving.parcel import ParcelError, adler32_chunks
from ..precision.quant8 import SLOT_SCALE_POOLS
from .checks import check_int32_array, pad_slot_id
from .manager import MambaCacheManagerBase

__all__ = ["NumpyMambaCacheManager"]


class NumpyMambaCacheManager(MambaCacheManagerBase):
    """Per-layer Mamba (recurrent + conv) state manager on host NumPy arrays: the reference.

    Each recurrent layer owns a recurrent state ``[B, H, D, N]`` and a conv state ``[B, C, K]``;
    with ``max_intermediate_seq_len = S > 0`` also MTP intermediate states ``[B, S, H, D, N]`` and
    ``[B, S, C, K]``. All are zero-initialised ``numpy.ndarray`` views of one allocation per state
    kind. ``num_recurrent_layers == 0`` (or no config) makes the manager a no-op.

    ``stream`` arguments are accepted for interface parity with the Numba backend and ignored.

    Args:
        config: the cache configuration; ``None`` builds an empty manager.
        stream: ignored.

    Raises:
        TypeError: ``config`` is not a [`Config`][mamba_cache.Config].
        MemoryError: the pools would not fit in physical RAM (checked before allocating).

    Example:
        >>> import numpy as np
        >>> from mamba_cache import Config, NumpyMambaCacheManager
        >>> cfg = Config(num_recurrent_layers=2, max_batch_size=4, recurrent_state_num_heads=2,
        ...              recurrent_state_head_dim=4, recurrent_state_size=8, conv_dim=16,
        ...              conv_kernel=4, max_intermediate_seq_len=3)
        >>> cache = NumpyMambaCacheManager(cfg)
        >>> cache.get_recurrent_state(0).shape
        (4, 2, 4, 8)
        >>> cache.reshape_intermediate_states(2, 3)
        >>> cache.get_intermediate_conv_state(1).shape
        (2, 3, 16, 4)
        >>> cache.scatter_mtp_states(np.array([2, 0], dtype=np.int32))
    """

    backend = "numpy"

    def _stream(self, stream: Any) -> Any:
        return None

    def _available_bytes(self) -> tuple[int, str]:
        # np.zeros only reserves address space; a config larger than RAM would fail at first touch
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX: let NumPy decide
            return 2**63 - 1, "host memory"
        return physical, "host memory (physical RAM)"

    def _zeros(self, shape: tuple, dtype: np.dtype, stream: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def _zero_fill(self, pool_a: np.ndarray, pool_b: np.ndarray, stream: Any) -> None:
        pool_a[...] = 0
        pool_b[...] = 0

    def _capture(self, pool: np.ndarray, slot: int, stream: Any) -> np.ndarray:
        return self._export(pool[:, slot : slot + 1].copy(), pool.dtype)

    def _read_only(self, array: np.ndarray) -> np.ndarray:
        view = array.view()
        view.flags.writeable = False
        return view

    def _export(self, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
        # NumPy exports DLPack itself, except ml_dtypes' bfloat16: those views get a subclass that does
        from ..interop.arrays import host_export

        return host_export(array)

    def _capture_into(self, pool: np.ndarray, slot: int, out: np.ndarray, stream: Any) -> None:
        out[...] = pool[:, slot : slot + 1]

    def _int32_array(self, name: str, array: Any, layout: str, stream: Any) -> tuple[np.ndarray, tuple]:
        if hasattr(array, "__cuda_array_interface__"):
            raise TypeError(
                f"{name} must be a host numpy.ndarray for the NumPy backend, got a device array "
                f"({type(array).__name__}); copy it to the host first"
            )
        array = _host_dlpack(name, array)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of int32, got {type(array).__name__}")
        shape = check_int32_array(name, array.dtype, array.shape, array.flags.c_contiguous, layout)
        return array, shape

    def _scatter(
        self,
        accept: np.ndarray,
        indices: Any,
        active: int,
        seq_len: int,
        max_accept: int,
        stream: Any,
        positions: Any = None,
    ) -> None:
        # Row b commits step accept[b] - 1 when 0 <= step < max_accept. The intermediate buffer of
        # a layer is [active, V, elems] from its start, so (b, step) is row b * V + step of it seen
        # as [B * S, elems]. int64 keeps INT32_MIN - 1 from wrapping.
        step = accept.astype(np.int64) - 1
        self._commit(step, (step >= 0) & (step < max_accept), indices, seq_len, positions, step + 1)

    def _scatter_tree(
        self,
        nodes: np.ndarray,
        accept: np.ndarray,
        indices: Any,
        active: int,
        seq_len: int,
        stream: Any,
        positions: Any = None,
    ) -> None:
        # The committed node is the last non-negative id among the first min(accept, M) entries.
        width = nodes.shape[1]
        considered = (np.arange(width) < np.clip(accept.astype(np.int64), 0, width)[:, None]) & (nodes >= 0)
        last = width - 1 - np.argmax(considered[:, ::-1], axis=1)
        node = nodes[np.arange(active), last].astype(np.int64)
        self._commit(node, considered.any(axis=1) & (node < seq_len), indices, seq_len, positions, last + 1)

    def _commit(
        self, step: np.ndarray, ok: np.ndarray, indices: Any, seq_len: int, positions: Any = None, consumed: Any = None
    ) -> None:
        """``pool[:, slot[b]] = intermediate[:, b * V + step[b]]`` for the rows where ``ok``, both kinds.

        Converted to the pool's dtype when the dtypes differ
        ([`mamba_cache.precision.convert`][mamba_cache.precision.reference.convert]); a stochastic rounding takes the
        state of row ``b`` as having consumed ``positions[b] + consumed[b]`` tokens.
        """
        pools = self._pools
        slots, rows = self._commit_rows(ok, indices)
        src_rows = rows * seq_len + step[rows]
        for kind, (pool, inter) in enumerate(
            ((pools.recurrent, pools.intermediate_recurrent), (pools.conv, pools.intermediate_conv))
        ):
            if pool.dtype.itemsize == 1:  # an 8-bit pool: values with their scales
                position = 0 if positions is None else positions.astype(np.int64)[rows] + consumed[rows]
                shift = None if consumed is None else consumed[rows]
                self._commit8(("recurrent", "conv")[kind], slots[rows], src_rows, position, shift)
                continue
            layers, count = pool.shape[:2]
            dst = pool.reshape(layers, count, -1)
            src = inter.reshape(layers, -1, dst.shape[2])
            if dst.dtype == src.dtype:
                dst[:, slots[rows]] = src[:, src_rows]
                continue
            from ..precision import convert

            position = 0 if positions is None else positions.astype(np.int64)[rows] + consumed[rows]
            dst[:, slots[rows]] = convert(
                src[:, src_rows],
                dst.dtype,
                stochastic=self._config.stochastic_rounding,
                seed=self._config.rounding_seed,
                kind=kind,
                layer=np.arange(layers)[:, None],
                position=position,
            )

    def _commit_rows(self, ok: np.ndarray, indices: Any) -> tuple:
        """``(slots, rows)``: each row's slot; the committing rows (``ok``, slot in range); refuses a shared slot."""
        slots = np.arange(ok.shape[0]) if indices is None else indices.astype(np.int64)
        ok = ok & (slots >= 0) & (slots < self._config.max_batch_size)
        rows = np.flatnonzero(ok)
        targets, counts = np.unique(slots[rows], return_counts=True)
        if (counts > 1).any():  # the GPU gives no defined winner: the checked reference refuses
            raise ValueError(
                f"committing rows must name distinct slots; slot {int(targets[counts > 1][0])} is named "
                f"by {int(counts.max())} rows (state_indices); nothing was changed"
            )
        return slots, rows

    def _commit8(
        self, kind: str, targets: np.ndarray, src_rows: np.ndarray, position: Any, shift: Any, into: Any = None
    ) -> None:
        """The scatter / tree commit of one kind into its 8-bit pool (``targets``: slots, ``src_rows``: per-step rows).

        8-bit per-step states: values and scales copied. Wider ones: a recurrent state is quantised
        (with its residual fed back under ``error_feedback``); a conv window keeps its stored columns,
        moved ``shift`` places, and takes its ``shift`` new columns quantised
        ([`mamba_cache.precision.quant8`][mamba_cache.precision.quant8]). ``into``: ``(values, scales,
        residual or None, rows)``, where the result goes instead of the slots (a tracked entry: what
        this commit would give the slot, read from the slot's residual and window).
        """
        from ..precision.quant8 import shift_in_columns, store

        config, pools = self._config, self._pools
        pool, inter = getattr(pools, kind), getattr(pools, f"intermediate_{kind}")
        scales = self._scales[f"scales_{kind}"]
        residual = self._scales.get(f"residual_{kind}")
        out_pool, out_scales, out_residual, out_rows = into or (pool, scales, residual, targets)
        layers = pool.shape[0]
        if inter.dtype == pool.dtype:  # the plain 8-bit scatter: a copy of the stored values and scales
            inter_scales = self._scales[f"scales_intermediate_{kind}"]
            for dst, src in ((out_pool, inter), (out_scales, inter_scales)):
                flat = dst.reshape(layers, dst.shape[1], -1)
                flat[:, out_rows] = src.reshape(layers, -1, flat.shape[2])[:, src_rows]
            return
        states = inter.reshape(layers, -1, *pool.shape[2:])[:, src_rows]
        stored = store(
            states,
            pool.dtype,
            layout=kind,
            stochastic=config.stochastic_rounding,
            seed=config.rounding_seed,
            layer=np.arange(layers)[:, None],
            position=np.asarray(position)[None] if np.ndim(position) else position,
            residual=None if residual is None else residual[:, targets],
        )
        if kind == "recurrent":
            out_pool[:, out_rows], out_scales[:, out_rows] = stored.values, stored.scales
            if residual is not None:
                out_residual[:, out_rows] = stored.residual
            return
        out_pool[:, out_rows] = shift_in_columns(pool[:, targets], stored.values, shift)
        out_scales[:, out_rows] = shift_in_columns(scales[:, targets], stored.scales, shift)

    def _copy_rows(self, dst: tuple, src: tuple, src_rows: Any, dst_rows: Any, count: int, stream: Any) -> None:
        s, d = _copy_pairs(src_rows, dst_rows, count, src[0].shape[1], dst[0].shape[1], dst is src)
        for to, frm in zip(dst, src, strict=True):
            to[:, d] = frm[:, s]

    def _scatter_tracked(
        self,
        accept: np.ndarray,
        indices: Any,
        active: int,
        seq_len: int,
        max_accept: int,
        store: Any,
        entries: np.ndarray,
        steps: np.ndarray,
        stream: Any,
        positions: Any = None,
    ) -> None:
        # Checkpoint rows: 0 <= t < accept, t < V, entry in [0, P). Check them all before moving anything.
        step, entry = steps.astype(np.int64), entries.astype(np.int64)
        track = (step >= 0) & (step < accept) & (step < seq_len) & (entry >= 0) & (entry < store.entries)
        if indices is not None:  # a padding row tracks nothing (other out-of-range slots still track)
            track &= indices != pad_slot_id
        quant = bool(self._config.quantised_kinds)
        if quant:  # an 8-bit entry is computed from its slot's residual and window: the slot must exist
            slots = np.arange(accept.shape[0]) if indices is None else indices.astype(np.int64)
            track &= (slots >= 0) & (slots < self._config.max_batch_size)
        rows = np.flatnonzero(track)
        store.check_tracked_entries(entry[rows])
        commit = accept.astype(np.int64) - 1
        ok = (commit >= 0) & (commit < max_accept)
        if quant:  # the entries before the commit moves the slots' windows (nothing moves if it refuses)
            self._commit_rows(ok, indices)
            self._track8(store, rows, slots[rows], entry[rows], step[rows], seq_len, positions)
        self._commit(commit, ok, indices, seq_len, positions, commit + 1)  # may refuse: nothing moved yet
        pools = self._pools
        for kind, (dst, inter) in enumerate(
            zip(store.entry_pools[:2], (pools.intermediate_recurrent, pools.intermediate_conv), strict=True)
        ):
            if dst.dtype.itemsize == 1:  # an 8-bit kind: tracked above
                continue
            src = inter.reshape(inter.shape[0], -1, *dst.shape[2:])
            states = src[:, rows * seq_len + step[rows]]
            if dst.dtype != src.dtype:  # the store keeps the main dtype: convert as the commit does
                from ..precision import convert

                consumed = 0 if positions is None else positions.astype(np.int64)[rows] + step[rows] + 1
                flat = states.reshape(*states.shape[:2], int(np.prod(states.shape[2:])))  # no tracked row: size 0
                states = convert(
                    flat,
                    dst.dtype,
                    stochastic=self._config.stochastic_rounding,
                    seed=self._config.rounding_seed,
                    kind=kind,
                    layer=np.arange(dst.shape[0])[:, None],
                    position=consumed,
                ).reshape(states.shape)
            dst[:, entry[rows]] = states

    def _track8(
        self, store: Any, rows: np.ndarray, slots: np.ndarray, entries: np.ndarray, steps: np.ndarray, seq_len: int,
        positions: Any,
    ) -> None:  # fmt: skip
        """A scatter's tracking into 8-bit entries: entry ``e`` = what committing ``t + 1`` tokens gives the slot."""
        named = dict(zip(["recurrent", "conv", *(n for n in SLOT_SCALE_POOLS if n in self._scales)], store.entry_pools,
                         strict=True))  # fmt: skip
        position = 0 if positions is None else positions.astype(np.int64)[rows] + steps + 1
        for kind in self._config.quantised_kinds:
            into = (named[kind], named[f"scales_{kind}"], named.get(f"residual_{kind}"), entries)
            self._commit8(kind, slots, rows * seq_len + steps, position, steps + 1, into)

    def _host_zeros(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def _entry_to_host(self, src: tuple, entry: int, host: tuple, host_entry: int, stream: Any) -> None:
        for to, frm in zip(host, src, strict=True):
            to[host_entry] = frm[:, entry]

    def _host_to_rows(self, host: tuple, host_entry: int, dst: tuple, row: int, stream: Any) -> None:
        for to, frm in zip(dst, host, strict=True):
            to[:, row] = frm[host_entry]

    def _new_event(self) -> None:
        return None  # NumPy work is done when the call returns: nothing to order

    def _record_event(self, event: Any, stream: Any) -> None:
        pass

    def _wait_event(self, event: Any, stream: Any) -> None:
        pass

    def _zero_slot(self, slot: int, stream: Any) -> None:
        for pool in self._moving_pools():  # with any 8-bit scales and residuals
            pool[:, slot] = 0

    def _state_array(self, name: str, array: Any, shape: tuple, dtype: np.dtype) -> np.ndarray:
        if not hasattr(array, "__cuda_array_interface__"):
            array = _host_dlpack(name, array)
        if not isinstance(array, np.ndarray):
            kind = "a device array" if hasattr(array, "__cuda_array_interface__") else type(array).__name__
            raise TypeError(f"{name} must be a host numpy.ndarray for the NumPy backend, got {kind}")
        if array.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype.name} (the pool's), got {array.dtype.name}")
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(array.shape)}")
        if not array.flags.c_contiguous:  # as the Numba backend requires
            raise ValueError(f"{name} must be contiguous")
        return array

    def _write_slot(self, pool: np.ndarray, layer: int, slot: int, state: np.ndarray, stream: Any) -> None:
        pool[layer, slot] = state[0]

    def _from_host(self, array: np.ndarray, stream: Any) -> np.ndarray:
        return array

    def _to_host(self, array: np.ndarray, stream: Any) -> np.ndarray:
        return array

    def _replay(
        self,
        accept: np.ndarray,
        indices: Any,
        active: int,
        seq_len: int,
        stream: Any,
        nodes: Any = None,
        positions: Any = None,
        track: Any = None,
    ) -> None:
        from ..replay.reference import replay_commit

        config = self._config
        shapes = {name: shape for name, (shape, _) in config.replay_stash_fields.items()}
        if track is not None:
            store, entries, steps = track
            track = (store.entry_pools, entries, steps, store.check_tracked_entries)
        replay_commit(
            self._pools.recurrent,
            self._pools.conv,
            self._stash,
            shapes,
            accept,
            indices,
            seq_len,
            config.mixer,
            nodes,
            positions=positions,
            stochastic=config.stochastic_rounding,
            seed=config.rounding_seed,
            track=track,
            scales=self._scales,
        )

    # ------------------------------------------------------------ state parcels
    def _parcel_buffer(self, nbytes: int, stream: Any) -> np.ndarray:
        return np.zeros(nbytes, dtype=np.uint8)

    def _parcel_buffer_in(self, name: str, buffer: Any, nbytes: int, stream: Any) -> np.ndarray:
        buffer = _host_dlpack(name, buffer)
        if isinstance(buffer, (bytes, bytearray, memoryview)):
            buffer = np.frombuffer(buffer, dtype=np.uint8)
        if not isinstance(buffer, np.ndarray):
            raise TypeError(
                f"{name} must be a host numpy.ndarray of uint8 for the NumPy backend, got {type(buffer).__name__}"
            )
        if buffer.dtype != np.uint8 or buffer.ndim != 1 or not buffer.flags.c_contiguous:
            raise TypeError(
                f"{name} must be a contiguous 1-D uint8 array, got {buffer.dtype.name} {list(buffer.shape)}"
            )
        if buffer.size != nbytes:
            raise ParcelError(f"{name} holds {buffer.size} bytes, its descriptor says {nbytes}; nothing was changed")
        return buffer

    def _copy_runs(self, table: np.ndarray, buffer: np.ndarray, pools: tuple, to_buffer: bool, stream: Any) -> None:
        flat = [pool.reshape(-1).view(np.uint8) for pool in pools]
        for pool, src, dst, count in table.tolist():
            if to_buffer:
                buffer[dst : dst + count] = flat[pool][src : src + count]
            else:
                flat[pool][src : src + count] = buffer[dst : dst + count]

    def _chunk_checksums(self, buffer: np.ndarray, chunk_bytes: int, stream: Any) -> np.ndarray:
        return adler32_chunks(buffer, chunk_bytes)

    # ------------------------------------------------------------ checkpoint mode
    def _fold_slots(self, slots: np.ndarray, steps: np.ndarray) -> None:
        """Fold ``steps`` ring steps into each slot's checkpoint (reference arithmetic); ``p0 += steps``, ``h = 0``."""
        from ..checkpoint.reference import fold

        positions = self._checkpoint_positions
        pools = self._pools
        scales = self._scales or None
        fold(self._config, pools.recurrent, pools.conv, self._history, slots, steps, positions[slots], scales=scales)
        positions[slots] += steps
        self._history_lengths[slots] = 0

    def _committing_slots(self, slots: np.ndarray, ok: np.ndarray, what: str) -> np.ndarray:
        """The rows where ``ok`` and the slot is in ``[0, B)``; refuses two of them naming one slot."""
        in_range = (slots >= 0) & (slots < self._config.max_batch_size)
        ok = ok & in_range
        rows = np.flatnonzero(ok)
        targets, counts = np.unique(slots[rows], return_counts=True)
        if (counts > 1).any():  # the GPU gives no defined winner: the checked reference refuses
            raise ValueError(
                f"{what} must name distinct slots; slot {int(targets[counts > 1][0])} is named "
                f"{int(counts.max())} times; nothing was changed"
            )
        return rows

    def _checkpoint_commit(
        self, accept: np.ndarray, indices: Any, active: int, seq_len: int, stream: Any, track: Any = None
    ) -> None:
        accepted = accept.astype(np.int64)
        slots = np.arange(active) if indices is None else indices.astype(np.int64)
        rows = self._committing_slots(slots, (accepted >= 1) & (accepted <= seq_len), "committing rows")
        config = self._config
        targets = slots[rows]
        if track is not None:  # the state after the tracked step, from the checkpoint as it is before the commit
            self._track_ring(track, rows, targets, accepted[rows])
        after = self._history_lengths[targets].astype(np.int64) + accepted[rows]
        folds = after + config.max_intermediate_seq_len > config.history_len
        self._history_lengths[targets[~folds]] = after[~folds]
        if folds.any():
            self._fold_slots(targets[folds], after[folds])

    def _ring_state(self, slots: np.ndarray, extra: Any = 0) -> tuple:
        """``state_after`` of distinct ``slots``: each advanced through its ``h`` (plus ``extra``) ring steps.

        ``(recurrent, conv)``, and with 8-bit states a third item: their scales and residuals by pool name.
        """
        from ..checkpoint.reference import state_after

        steps = self._history_lengths[slots].astype(np.int64) + extra
        return state_after(
            self._config,
            self._pools.recurrent,
            self._pools.conv,
            self._history,
            slots,
            steps,
            self._checkpoint_positions[slots],
            scales=self._scales or None,
        )

    def _track_ring(self, track: tuple, rows: np.ndarray, targets: np.ndarray, accepted: np.ndarray) -> None:
        """Entry ``track_entries[b]`` = the state after ring step ``h + t`` of committing row ``b`` (``0 <= t < a``)."""
        store, entries, steps = track
        step, entry = steps.astype(np.int64)[rows], entries.astype(np.int64)[rows]
        ok = (step >= 0) & (step < accepted) & (entry >= 0) & (entry < store.entries)
        store.check_tracked_entries(entry[ok])  # refuses before anything is written
        if not ok.any():
            return
        recurrent, conv, *scales = self._ring_state(targets[ok], step[ok] + 1)
        store.entry_pools[0][:, entry[ok]] = recurrent
        store.entry_pools[1][:, entry[ok]] = conv
        if scales:  # an 8-bit cache: the entry's scales and residuals follow, in _moving_pools' order
            names = [n for n in SLOT_SCALE_POOLS if n in self._scales]
            for target, name in zip(store.entry_pools[2:], names, strict=True):
                target[:, entry[ok]] = scales[0][name]

    def _materialize(self, slots: np.ndarray, count: int, stream: Any) -> None:
        values = slots.astype(np.int64)
        rows = self._committing_slots(values, np.ones(count, dtype=bool), "materialize: slots")
        targets = values[rows]
        self._fold_slots(targets, self._history_lengths[targets].astype(np.int64))

    def _folded(self, slot: int, stream: Any) -> tuple[np.ndarray, np.ndarray]:
        recurrent, conv, *scales = self._ring_state(np.array([slot]))
        self._folded_scales = scales[0] if scales else {}  # capture_scales reads them
        return self._export(recurrent, recurrent.dtype), self._export(conv, conv.dtype)

    def _copy_folded(self, src: np.ndarray, dst: np.ndarray, count: int, stream: Any) -> None:
        self._copy_folded_into(self._moving_pools(), src, dst, count, stream, True)

    def _copy_folded_into(
        self, targets: tuple, src: Any, dst: Any, count: int, stream: Any, into_slots: bool = False
    ) -> None:
        """Rows ``dst`` of ``targets`` = the folded states of slots ``src``; ``into_slots``: a ``copy_slots``.

        ``into_slots`` (``targets`` are the main pools): destinations must not be sources, and each gets
        ``p0 = src p0 + h``, ``h = 0``.
        """
        batch = self._config.max_batch_size
        s, d = _copy_pairs(src, dst, count, batch, targets[0].shape[1], into_slots)
        if not s.size:
            return
        # A source may feed several destinations: fold each distinct source once.
        sources, inverse = np.unique(s, return_inverse=True)
        recurrent, conv, *scales = self._ring_state(sources)
        targets[0][:, d] = recurrent[:, inverse]
        targets[1][:, d] = conv[:, inverse]
        if len(targets) > 2:  # an 8-bit cache's scales and residuals follow, in _moving_pools' order
            names = [n for n in SLOT_SCALE_POOLS if n in self._scales]
            for target, name in zip(targets[2:], names, strict=True):
                target[:, d] = scales[0][name][:, inverse]
        if into_slots:
            consumed = self._checkpoint_positions[sources] + self._history_lengths[sources]
            self._checkpoint_positions[d] = consumed[inverse]
            self._history_lengths[d] = 0

    def _reset_checkpoints(self, slots: Any, positions: Any, stream: Any) -> None:
        where = slice(None)
        if slots is not None:  # a slot outside [0, B) is skipped (padding of restore_many)
            where = np.asarray(slots, dtype=np.int64).reshape(-1)
            ok = (where >= 0) & (where < self._config.max_batch_size)
            where = where[ok]
            positions = None if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)[ok]
        self._history_lengths[where] = 0
        if positions is not None:
            self._checkpoint_positions[where] = positions


def _copy_pairs(src_rows: Any, dst_rows: Any, count: int, src_bound: int, dst_bound: int, same_pool: bool) -> tuple:
    """The ``(source, destination)`` rows of a row copy that are both in range, checked as the reference checks.

    Raises:
        ValueError: a destination repeats, or (``same_pool``) is also a source; nothing was changed.
    """
    src_rows = np.asarray(src_rows, dtype=np.int64).reshape(count)
    dst_rows = np.asarray(dst_rows, dtype=np.int64).reshape(count)
    ok = (src_rows >= 0) & (src_rows < src_bound) & (dst_rows >= 0) & (dst_rows < dst_bound)
    s, d = src_rows[ok], dst_rows[ok]
    targets, counts = np.unique(d, return_counts=True)
    if (counts > 1).any():  # the GPU gives no defined winner: the checked reference refuses
        raise ValueError(
            f"copy destinations must be distinct; row {int(targets[counts > 1][0])} is a destination "
            f"{int(counts.max())} times; nothing was changed"
        )
    if same_pool and np.intersect1d(s, d).size:  # the GPU would race a read against a write
        raise ValueError(
            f"copy destinations must not also be sources; slot {int(np.intersect1d(s, d)[0])} is both; "
            "nothing was changed"
        )
    return s, d


def _host_dlpack(name: str, array: Any) -> Any:
    """A host DLPack tensor (a CPU torch tensor, ...) as a NumPy array of its memory; anything else as is.

    Raises:
        TypeError: the tensor is not in host memory (``copy it to the host first``).
    """
    if isinstance(array, np.ndarray) or not hasattr(array, "__dlpack__"):
        return array
    from ..interop import dlpack

    device_type = int(array.__dlpack_device__()[0])
    if device_type != dlpack.KDL_CPU:
        raise TypeError(
            f"{name} must be a host numpy.ndarray (or host DLPack tensor) for the NumPy backend, got a DLPack "
            f"tensor on device type {device_type}; copy it to the host first"
        )
    try:
        return np.from_dlpack(array)  # NumPy reads every dtype but bfloat16 (it refuses that one)
    except (BufferError, RuntimeError) as error:
        raise TypeError(f"{name}: could not import it through DLPack ({error})") from None
