"""The backend interface: what a backend binds, and what the manager, the backends and the prefix store share.

A backend subclasses [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase] and implements the
hooks of [`BackendHooks`][mamba_cache.core.backend.BackendHooks] for its arrays and streams; the
manager's public operations (``core/slots.py``, ``core/commits.py``) call nothing else of it. The
prefix store (``mamba_cache.prefix``) drives the same hooks on the manager it is built on: pools
(``_zeros``, ``_host_zeros``), streams (``_stream``), row copies (``_copy_rows``, ``_entry_to_host``,
``_host_to_rows``), events (``_new_event``, ``_record_event``, ``_wait_event``), index arguments
(``_int32_array``), launch-cache invalidation (``_forget``) and the device context
(``_run_on_device``), besides the manager's own state (``_check_open``, the stacked pools).

Types, as the hooks take and return them (each backend fixes them; to the type checker they are
``Any``): an ``Array`` is a ``numpy.ndarray`` (NumPy reference) or a
``numba.cuda`` device array (Numba); a ``Stream`` is ``None`` (NumPy) or a ``StreamRef`` (Numba); an
``IndexArg`` is a checked int32 index array: the host ``numpy.ndarray`` (NumPy) or a
``launch.DeviceArg`` (array, device pointer, shape) (Numba).
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeAlias

import numpy as np

from .._config import Config

#: A backend array: ``numpy.ndarray`` (NumPy reference), a ``numba.cuda`` ``DeviceNDArray`` (Numba).
Array: TypeAlias = Any
#: A resolved ``stream`` argument, as ``_stream`` returns it: ``None`` (NumPy), a ``StreamRef`` (Numba).
Stream: TypeAlias = Any
#: A checked int32 index argument, as ``_int32_array`` returns it: the host ``numpy.ndarray`` (NumPy),
#: a ``launch.DeviceArg`` (array, device pointer, shape) (Numba).
IndexArg: TypeAlias = Any
#: An array shape.
Shape: TypeAlias = tuple[int, ...]


class StatePools(NamedTuple):
    """The four stacked allocations of a manager (the intermediate ones ``None`` without MTP)."""

    recurrent: Array
    conv: Array
    intermediate_recurrent: Array | None
    intermediate_conv: Array | None


class EntryStore:
    """What a commit that tracks checkpoints needs of the store it writes into (``mamba_cache.prefix``).

    [`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] is the one implementation; the commits
    (``core/commits.py``) and the backends use nothing else of it.
    """

    #: The entries, one ``[L, P, ...]`` array per state kind (recurrent, conv), in the main pools'
    #: dtypes and layouts: a tracking commit writes the state after step ``t`` into ``[:, entry]``.
    entry_pools: tuple[Array, Array]
    #: ``P``, the number of entries (a tracked entry outside ``[0, P)`` tracks nothing).
    entries: int

    def check_tracking(self, manager: Any, what: str) -> None:
        """Raise ``ValueError`` unless this store is open and belongs to ``manager`` (``what``: the caller)."""
        raise NotImplementedError

    def check_tracked_entries(self, entries: np.ndarray) -> None:
        """NumPy reference: raise ``ValueError`` unless the tracking rows name distinct, reserved entries."""
        raise NotImplementedError

    def tracked_on(self, stream: Any) -> None:
        """Called after a tracking commit was queued on ``stream`` (orders the store's later copies after it)."""
        raise NotImplementedError


class BackendHooks:
    """The hooks a backend implements (``NotImplementedError`` here), and the defaults it may keep.

    Only the manager's operations, the prefix store and the backend call them; engines never do.
    """

    def _check_config(self, config: Config) -> None:
        """Refuse a config the backend cannot serve (raise ``ConfigError``). Default: accept."""

    def _available_bytes(self) -> tuple[int, str]:
        """(bytes the pools may take, what memory that is), checked before allocating."""
        raise NotImplementedError

    def _release_partial(self) -> None:
        """Return memory of pools dropped after a failed allocation. Default: nothing to do."""

    def _stream(self, stream: Any) -> Stream:
        """Turn the user's ``stream`` argument into what the other hooks take."""
        raise NotImplementedError

    def _zeros(self, shape: Shape, dtype: np.dtype, stream: Stream) -> Array:
        """Allocate a zeroed C-contiguous array."""
        raise NotImplementedError

    def _zero_fill(self, pool_a: Array, pool_b: Array, stream: Stream) -> None:
        """Zero two whole stacked pools (the same one twice is allowed)."""
        raise NotImplementedError

    def _capture(self, pool: Array, slot: int, stream: Stream) -> Array:
        """Return a new ``[L, 1, ...]`` array holding slot ``slot`` of every layer of ``pool``."""
        raise NotImplementedError

    def _capture_into(self, pool: Array, slot: int, out: Array, stream: Stream) -> None:
        """Copy slot ``slot`` of every layer of ``pool`` into the checked ``[L, 1, ...]`` ``out``."""
        raise NotImplementedError

    def _capture_pair_into(self, slot: int, outs: tuple[Array, Array], stream: Stream) -> None:
        """Copy slot ``slot`` of both main pools into the checked ``(recurrent, conv)`` ``[L, 1, ...]`` outputs.

        Default: one ``_capture_into`` per kind; the Numba backend copies both in one launch.
        """
        self._capture_into(self._pools.recurrent, slot, outs[0], stream)
        self._capture_into(self._pools.conv, slot, outs[1], stream)

    def _split_layers(self, stacked: Array) -> list[Array]:
        """One view per layer of a stacked ``[L, ...]`` array."""
        return [stacked[layer] for layer in range(stacked.shape[0])]

    def _read_only(self, array: Array) -> Array:
        """A view of ``array`` that cannot be written where the backend can say so. Default: ``array``."""
        return array

    def _export(self, array: Array, dtype: np.dtype) -> Array:
        """A view handed to the user, as the class that exports DLPack (``dtype``: the cache's dtype of it).

        Default: ``array`` itself.
        """
        return array

    def _int32_array(self, name: str, array: Any, layout: str, stream: Stream) -> tuple[IndexArg, Shape]:
        """Check an int32 index array argument (kind, device, dtype, rank, contiguity).

        Returns (what the scatter hooks take, its shape); raises before touching any state.
        """
        raise NotImplementedError

    def _scatter(
        self,
        accept: IndexArg,
        indices: IndexArg | None,
        active: int,
        seq_len: int,
        max_accept: int,
        stream: Stream,
        positions: IndexArg | None = None,
    ) -> None:
        """Commit row ``b``'s step ``accept[b] - 1`` when ``1 <= accept[b] <= max_accept``, both kinds.

        The slot is ``indices[b]`` (``b`` when ``indices`` is None), skipped outside ``[0, B)``.
        Pools of other dtypes than their intermediate ones are converted in the same launch
        (``positions``, checked, or None: the stochastic-rounding positions, see ``_positions``).
        """
        raise NotImplementedError

    def _replay(
        self,
        accept: Any,
        indices: Any,
        active: int,
        seq_len: int,
        stream: Any,
        nodes: Any = None,
        positions: Any = None,
        track: Any = None,
    ) -> None:
        """Replay row ``b``'s steps ``0 .. accept[b] - 1`` into its slot when ``1 <= accept[b] <= V``.

        With ``nodes`` (``[active, M]``, a tree): the steps are ``nodes[b, :min(accept[b], M)]``.
        ``positions``: checked ``[active]`` int32 or None (stochastic rounding keys). ``track``:
        ``(store, entries, steps)`` or None (prefix-store checkpoints, in the same launch).
        """
        raise NotImplementedError

    def _scatter_tree(
        self,
        nodes: IndexArg,
        accept: IndexArg,
        indices: IndexArg | None,
        active: int,
        seq_len: int,
        stream: Stream,
        positions: IndexArg | None = None,
    ) -> None:
        """Row ``b`` commits its last accepted tree node (see ``scatter_accepted_tree_states``)."""
        raise NotImplementedError

    def _zero_slot(self, slot: int, stream: Stream) -> None:
        """Zero slot ``slot`` of every layer of the main recurrent and conv pools."""
        raise NotImplementedError

    def _copy_rows(self, dst: tuple, src: tuple, src_rows: Any, dst_rows: Any, count: int, stream: Any) -> None:
        """``dst[k][:, dst_rows[i]] = src[k][:, src_rows[i]]`` for both kinds ``k`` and ``i < count``, one launch.

        ``dst`` and ``src`` are (recurrent, conv) pairs of stacked ``[L, rows, ...]`` arrays with
        the same per-row layout (the main pools, or a prefix store's entries). The rows are either
        two ints (``count == 1``) or two arrays checked by ``_int32_array``. A pair with either row
        out of range is skipped. The NumPy reference refuses repeated destinations, and
        destinations that are also sources when ``dst is src`` (``ValueError``, nothing changed).
        """
        raise NotImplementedError

    def _host_zeros(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """Zeroed host memory for a prefix store's host tier (page-locked where the backend can)."""
        raise NotImplementedError

    def _entry_to_host(self, src: tuple, entry: int, host: tuple, host_entry: int, stream: Any) -> None:
        """Queue ``host[k][host_entry] = src[k][:, entry]`` (device to host) for both kinds on ``stream``.

        ``src`` are stacked ``[L, rows, ...]`` device pools; ``host`` are ``[P_host, L, ...]`` (one
        host entry dense).
        """
        raise NotImplementedError

    def _host_to_rows(self, host: tuple, host_entry: int, dst: tuple, row: int, stream: Any) -> None:
        """Queue ``dst[k][:, row] = host[k][host_entry]`` (host to device) for both kinds on ``stream``."""
        raise NotImplementedError

    def _forget(self, arrays: tuple, staging_name: str | None = None) -> None:
        """Drop what the backend keeps bound to ``arrays`` (prepared launches, copies) and to ``staging_name``.

        A prefix store calls it when it closes, so no cached launch outlives its entries. Default:
        nothing is kept.
        """

    def _new_event(self) -> Any:
        """A fresh event for ordering copies across streams (``None`` where work is synchronous)."""
        raise NotImplementedError

    def _record_event(self, event: Any, stream: Any) -> None:
        """Record ``event`` on ``stream`` (after the work queued so far)."""
        raise NotImplementedError

    def _wait_event(self, event: Any, stream: Any) -> None:
        """Make ``stream`` wait (on the device, no host synchronisation) for ``event``."""
        raise NotImplementedError

    def _scatter_tracked(
        self,
        accept: Any,
        indices: Any,
        active: int,
        seq_len: int,
        max_accept: int,
        store: Any,
        entries: Any,
        steps: Any,
        stream: Any,
        positions: Any = None,
    ) -> None:
        """``_scatter`` fused with checkpoint tracking into a prefix store, in one launch.

        Row ``b``'s state after step ``steps[b]`` goes into store entry ``entries[b]`` when
        ``0 <= steps[b] < accept[b]``, ``steps[b] < seq_len`` and the entry is in range. With mixed
        dtypes both copies convert to the main dtype (a stochastic one keyed by ``positions[b]``
        plus the tokens the copied state consumed).
        """
        raise NotImplementedError

    # ------------------------------------------------------------ checkpoint mode (core/checkpoint.py)
    def _checkpoint_commit(
        self,
        accept: IndexArg,
        indices: IndexArg | None,
        active: int,
        seq_len: int,
        stream: Stream,
        track: tuple | None = None,
    ) -> None:
        """Count row ``b``'s ``accept[b]`` ring steps into its slot, folding when ``h' + S > R``.

        See ``checkpoint_mtp_states``: rows with ``accept[b]`` outside ``[1, seq_len]`` or a slot
        outside ``[0, B)`` are skipped; the NumPy reference refuses repeated committing slots.
        ``track``: ``(store, entries, steps)`` or None; a tracked state is computed from the
        checkpoint as it was before the commit.
        """
        raise NotImplementedError

    def _materialize(self, slots: IndexArg, count: int, stream: Stream) -> None:
        """Fold each listed slot (its ``h`` ring steps) into its checkpoint; ``p0 += h``, ``h = 0``."""
        raise NotImplementedError

    def _folded(self, slot: int, stream: Stream) -> tuple[Array, Array]:
        """New ``(recurrent [L, 1, H, D, N], conv [L, 1, C, K])`` arrays: slot ``slot`` after ``p0 + h`` tokens."""
        raise NotImplementedError

    def _capture_folded_into(self, slot: int, targets: tuple, stream: Stream) -> None:
        """``capture_states`` in checkpoint mode: slot ``slot`` after ``p0 + h`` tokens into the checked outputs.

        This default captures ``_folded``'s new arrays; a backend may write the outputs directly.
        """
        for pool, target in zip(self._folded(slot, stream), targets, strict=True):
            self._capture_into(pool, 0, target, stream)

    def _copy_folded_into(self, targets: tuple, src: Any, dst: Any, count: int, stream: Stream) -> None:
        """Rows ``dst`` of ``targets`` = the folded states of slots ``src``.

        ``targets``: ``[L, X, ...]`` recurrent and conv stacks (a prefix store's entries); pairs out of
        range are skipped; the sources and the counters are unchanged.
        """
        raise NotImplementedError

    def _copy_folded(self, src: IndexArg, dst: IndexArg, count: int, stream: Stream) -> None:
        """``copy_slots`` in checkpoint mode: each destination gets its source's folded state, ``p0 + h`` and ``h = 0``.

        Pairs with a slot out of range are skipped; the NumPy reference refuses repeated
        destinations and destinations that are also sources. Sources are unchanged.
        """
        raise NotImplementedError

    def _reset_checkpoints(self, slots: np.ndarray | None, positions: np.ndarray | None, stream: Stream) -> None:
        """``h[slots] = 0`` and, given ``positions`` (host int64), ``p0[slots] = positions``; ``slots`` None: all.

        ``slots``: a host int array (or, Numba, a checked device index array); a slot outside ``[0, B)`` is skipped.
        """
        raise NotImplementedError

    def _state_array(self, name: str, array: Any, shape: Shape, dtype: np.dtype) -> Array:
        """Check one captured state against a pool slot (kind, device, dtype, shape); return a handle."""
        raise NotImplementedError

    def _write_slot(self, pool: Array, layer: int, slot: int, state: Array, stream: Stream) -> None:
        """Copy one checked ``[1, ...]`` state into ``pool[layer, slot]``."""
        raise NotImplementedError

    def _from_host(self, array: np.ndarray, stream: Stream) -> Array:
        """A host array as the backend's array (a device copy for the Numba backend)."""
        raise NotImplementedError

    def _to_host(self, array: Array, stream: Stream) -> np.ndarray:
        """A backend array as a host array."""
        raise NotImplementedError
