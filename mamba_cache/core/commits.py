"""The verify pass's view and the commits of the manager: reshape, scatter, tree and replay commits.

A mixin of [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase] (documented there): each
commit checks every argument (``core/checks.py``) before it calls the backend's one launch
(``core/backend.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..precision.reference import rounds_stochastically
from .backend import EntryStore
from .checks import check_index, check_size

KINDS = ("recurrent", "conv")


class CommitOperations:
    """The verify view (``reshape_intermediate_states``) and the commits of accepted draft states."""

    def reshape_intermediate_states(self, active_batch_size: int, seq_len: int) -> None:
        """Reinterpret every intermediate buffer as ``[active_batch_size, seq_len, ...]``.

        The verify pass writes its per-token states contiguously from the start of each layer's
        buffer; afterwards each intermediate tensor is a view of the first
        ``active_batch_size * seq_len * elems`` elements. No data moves. In replay mode the
        stash views (``get_replay_stash``) are reshaped the same way. In checkpoint mode only
        the view is recorded (``[active, V]``: the rows a commit may name, the window it counts
        in); the ring views (``get_history``) stay ``[B, R, ...]``. No-op without intermediate
        buffers, stash or ring.

        Args:
            active_batch_size: in ``[1, B]``.
            seq_len: the verify length V, in ``[1, S]``.

        Raises:
            ValueError: an argument outside its range (nothing changes).
            TypeError: an argument is not an integer.
        """
        self._check_open("reshape_intermediate_states")
        if not self.has_intermediate_recurrent_states() and not self._stash and not self._history:
            return
        config = self._config
        active = check_size("active_batch_size", active_batch_size, 1, config.max_batch_size)
        seq = check_size("seq_len", seq_len, 1, config.max_intermediate_seq_len)
        if (active, seq) != self._verify_shape:
            self._verify_shape = (active, seq)
            for key in [k for k in self._view_cache if k[0].startswith(("intermediate_", "scales_intermediate_"))]:
                del self._view_cache[key]

    def _max_accept(self, seq_len: int) -> int:
        # The verify pass either left the final state in the main pool (a full accept needs no
        # copy: commit steps 0 .. V-2) or left the pool untouched (commit steps 0 .. V-1).
        return seq_len - 1 if self._config.verify_writes_main_pool else seq_len

    def _accept_and_indices(self, accept_lengths: Any, state_indices: Any, stream: Any) -> tuple:
        """Check ``accept_lengths`` ``[active]`` and the optional ``state_indices`` ``[active]``."""
        accept, (active,) = self._int32_array("accept_lengths", accept_lengths, "[active]", stream)
        view = self._verify_shape[0]
        if active > view:
            # Rows past the current view were not written by this verify pass.
            raise ValueError(
                f"accept_lengths must have length in [0, {view}] (the active batch of the latest "
                f"reshape_intermediate_states; max_batch_size before any), got {active}"
            )
        indices = None
        if state_indices is not None:
            indices, (count,) = self._int32_array("state_indices", state_indices, "[active]", stream)
            if count != active:
                raise ValueError(f"state_indices must have the length of accept_lengths ({active}), got {count}")
        return accept, indices, active

    def _positions(self, what: str, positions: Any, active: int, stream: Any) -> Any:
        """Check the optional ``positions`` ``[active]`` int32 argument of a commit (None stays None).

        Required when the commit rounds stochastically: a scatter that stores a wider per-step state
        into a 2-byte main pool, a replay whose computed float32 steps are stored into a 2-byte
        recurrent state (``rounds_stochastically``).

        Raises:
            ValueError: it is missing while the commit rounds stochastically, or has another length.
        """
        if positions is None:
            config = self._config
            if config.commit_mode == "replay":
                sources = [("recurrent", np.float32)]
            else:
                sources = [(kind, getattr(config, f"intermediate_{kind}_state_dtype")) for kind in KINDS]
            if any(
                rounds_stochastically(config.stochastic_rounding, getattr(config, f"{kind}_state_dtype"), source)
                for kind, source in sources
            ):
                raise ValueError(
                    f"{what}: positions (int32 [active], tokens each row's main state had consumed before the "
                    "verify pass) is required: this commit rounds stochastically; nothing was changed"
                )
            return None
        checked, (count,) = self._int32_array("positions", positions, "[active]", stream)
        if count != active:
            raise ValueError(f"positions must have the length of accept_lengths ({active}), got {count}")
        return checked

    def scatter_mtp_states(
        self,
        accept_lengths: Any,
        stream: Any = None,
        *,
        state_indices: Any = None,
        positions: Any = None,
        store: Any = None,
        track_entries: Any = None,
        track_steps: Any = None,
    ) -> None:
        """Commit each row's last accepted intermediate state into the main pools.

        For every layer and every row ``b < len(accept_lengths)``, with ``V`` the current second
        dimension of the intermediate views and ``a = accept_lengths[b]``: if ``1 <= a <= V - 1``
        (``1 <= a <= V`` when ``Config.verify_writes_main_pool`` is False) the slot receives
        ``intermediate[b, a - 1]`` of both state kinds; otherwise (padding ``<= 0``, or a full
        accept whose final state the verify pass already left in the pool, or out of range) it is
        untouched. The slot is ``b``, or ``state_indices[b]`` when given; a row whose index is
        outside ``[0, B)`` is skipped. Slots no row commits to are never touched; any int32 value
        is safe. Committing rows must name distinct slots.

        Args:
            accept_lengths: ``[active]`` int32, ``active <= B``: accepted tokens per row (NumPy
                backend: a host ``numpy.ndarray``; Numba backend: on the device, see there).
            stream: the stream to run on (ignored by the NumPy backend).
            state_indices: optional ``[active]`` int32, the pool slot of each row (keyword only).
            positions: optional ``[active]`` int32 (keyword only): tokens row ``b``'s main state had
                consumed before the verify pass, ``p``; the committed state after step ``t`` has
                consumed ``p + t + 1``. Required when ``Config.stochastic_rounding`` is on and a
                float32/float64 per-step state is stored into a 16-bit pool (its rounding bits are
                keyed by that position, never by the slot or the step); ignored otherwise.
            store: a [`mamba_cache.prefix.PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] of this manager whose
                entries receive tracked checkpoints (keyword only; give all three tracking arguments or none).
            track_entries: ``[active]`` int32, the store entry (from ``store.reserve()``) row ``b``
                checkpoints into; any value outside ``[0, P)`` tracks nothing.
            track_steps: ``[active]`` int32, the draft step whose state row ``b`` checkpoints, ``-1``
                for none. In the same launch as the commit, entry ``track_entries[b]`` receives
                ``intermediate[b, t]`` (``t = track_steps[b]``) of both kinds when
                ``0 <= t < accept_lengths[b]`` and ``t < V``, converted to the main dtype as the
                commit converts (a stochastic rounding keyed by position ``positions[b] + t + 1``).
                With 8-bit states the entry receives what committing ``t + 1`` tokens would give
                the slot (values, scales, residuals), computed from the slot's window and residual
                before the commit (on the Numba backend in a launch before it), and a row whose
                slot is outside ``[0, B)`` tracks nothing.

        Raises:
            TypeError: an array is of the wrong kind (a device array for the NumPy backend, a
                list, ...) or not int32; or ``stream`` is of an unknown kind; or ``store`` is not a
                prefix store.
            ValueError: an array is not 1-D or not contiguous, ``accept_lengths`` is longer than the
                active batch of the current view, ``state_indices`` or a tracking array has another
                length, only some tracking arguments are given, ``store`` belongs to another manager,
                the manager was closed or moved from, or (NumPy reference) two committing rows name
                one slot, two tracking rows name one entry, or a tracking row names an entry that is
                not reserved.
        """
        self._check_open("scatter_mtp_states")
        self._refuse_in_replay_mode("scatter_mtp_states")
        stream = self._stream(stream)
        self._tracking_given("scatter_mtp_states", store, track_entries, track_steps)
        if not self.has_intermediate_recurrent_states():
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        checked_positions = self._positions("scatter_mtp_states", positions, active, stream)
        if store is not None:
            entries, steps = self._tracking("scatter_mtp_states", store, track_entries, track_steps, active, stream)
            if active:
                seq_len = self._verify_shape[1]
                max_accept = self._max_accept(seq_len)
                self._scatter_tracked(
                    accept, indices, active, seq_len, max_accept, store, entries, steps, stream, checked_positions
                )
                store.tracked_on(stream)
            return
        if active:
            seq_len = self._verify_shape[1]
            self._scatter(
                accept, indices, active, seq_len, self._max_accept(seq_len), stream, positions=checked_positions
            )

    def scatter_accepted_tree_states(
        self,
        accepted_node_ids: Any,
        accept_lengths: Any,
        state_indices: Any = None,
        stream: Any = None,
        *,
        positions: Any = None,
    ) -> None:
        """Tree verification: commit each row's last accepted node into the main pools.

        The verify pass wrote the state after each of the ``V`` tree nodes into the intermediate
        buffers (``[b, node]`` of the current ``[active, V]`` view). For row ``b``, the committed
        node is the last non-negative id among the first ``min(accept_lengths[b], max_accept_len)``
        entries of ``accepted_node_ids[b]``; a row with none, or whose node is ``>= V``, is skipped,
        as is a row whose ``state_indices[b]`` is outside ``[0, B)``. The node's state is always
        copied: a tree's verify pass cannot leave "the" final state in the main pool. One launch
        covers every layer and both state kinds.

        Args:
            accepted_node_ids: ``[active, max_accept_len]`` int32 node ids in acceptance order.
            accept_lengths: ``[active]`` int32, ``active <= B``.
            state_indices: optional ``[active]`` int32 pool slot of each row (default: row ``b``).
            stream: the stream to run on (ignored by the NumPy backend).
            positions: optional ``[active]`` int32 (keyword only), as in ``scatter_mtp_states``; the
                node at index ``j`` of ``accepted_node_ids[b]`` has consumed ``positions[b] + j + 1``
                tokens.

        Raises:
            TypeError: an array is of the wrong kind or not int32; or ``stream`` is of an unknown kind.
            ValueError: wrong rank, not contiguous, ``accept_lengths`` longer than the view, or the rows of
                ``accepted_node_ids`` / ``state_indices`` differ from ``len(accept_lengths)``.
        """
        self._check_open("scatter_accepted_tree_states")
        self._refuse_in_replay_mode("scatter_accepted_tree_states")
        stream = self._stream(stream)
        if not self.has_intermediate_recurrent_states():
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        nodes, shape = self._int32_array("accepted_node_ids", accepted_node_ids, "[active, max_accept_len]", stream)
        if shape[0] != active:
            raise ValueError(f"accepted_node_ids must have len(accept_lengths) = {active} rows, got {shape[0]}")
        checked_positions = self._positions("scatter_accepted_tree_states", positions, active, stream)
        if active and shape[1]:
            self._scatter_tree(
                nodes, accept, indices, active, self._verify_shape[1], stream, positions=checked_positions
            )

    # ------------------------------------------------------------ replay commit
    def _refuse_in_replay_mode(self, what: str) -> None:
        """Refuse a scatter commit on a cache that keeps no per-step states (naming the commit to use)."""
        if self._config.commit_mode == "replay":
            raise ValueError(
                f"{what}: this cache has commit_mode='replay' and keeps no per-step states; "
                "commit with replay_mtp_states / replay_accepted_tree_states instead (nothing changed)"
            )
        self._refuse_in_checkpoint_mode(what)

    def _refuse_in_checkpoint_mode(self, what: str) -> None:
        """Refuse a scatter, replay or tree commit in checkpoint mode (naming ``checkpoint_mtp_states``)."""
        if self._pools is None or self._config.commit_mode != "checkpoint":
            return
        if "tree" in what:
            raise ValueError(
                f"{what}: commit_mode='checkpoint' has no tree commit: an accepted tree path is not contiguous "
                "in the history ring (a commit only counts accepted ring steps); nothing changed"
            )
        raise ValueError(
            f"{what}: this cache has commit_mode='checkpoint' and keeps a history ring; commit with "
            "checkpoint_mtp_states instead (nothing changed)"
        )

    def has_replay_stash(self) -> bool:
        """True when the replay stash is allocated (``commit_mode='replay'``, layers, ``S > 0``)."""
        return bool(self._stash)

    def get_replay_stash(self, recurrent_layer_idx: int) -> dict:
        """The replay stash of one layer: field name to a ``[active, V, ...]`` view.

        ``(active, V)`` is ``(B, S)`` until
        [`reshape_intermediate_states`][mamba_cache.MambaCacheManagerBase.reshape_intermediate_states] changes it; like
        the intermediate states, each view is the first ``active * V * elems`` elements of the layer's buffer (a
        reinterpretation). Fields (``Config.replay_stash_fields``): Mamba2 ``dA [H]``, ``u [H, D]``, ``B [G, N]``
        float32; Gated DeltaNet ``g [H]``, ``beta [H]``, ``k [G, D]``, ``v [H, N]`` float32; both ``conv [C]`` in the
        conv dtype (the conv input column).

        Raises:
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
            ValueError: the cache is not in replay mode or has no stash (``max_intermediate_seq_len == 0``),
                or it was closed / moved from.
        """
        self._require_pools("get_replay_stash")
        index = check_index("recurrent_layer_idx", recurrent_layer_idx, self._config.num_recurrent_layers)
        if self._history:
            raise ValueError(
                "get_replay_stash: commit_mode='checkpoint' keeps no replay stash; the verify pass writes the "
                "history ring (get_history) instead"
            )
        if not self._stash:
            raise ValueError(
                "get_replay_stash: no replay stash is allocated (needs commit_mode='replay' and "
                f"max_intermediate_seq_len > 0; got commit_mode={self._config.commit_mode!r}, "
                f"max_intermediate_seq_len={self._config.max_intermediate_seq_len})"
            )
        key = ("intermediate_stash", index)
        views = self._view_cache.get(key)
        if views is None:
            active, seq = self._verify_shape
            views = {}
            for name, (shape, dtype) in self._config.replay_stash_fields.items():
                elems = int(np.prod(shape))
                view = self._stash[name][index, : active * seq * elems].reshape((active, seq, *shape))
                views[name] = self._export(view, dtype)
            self._view_cache[key] = views
        return views

    def replay_mtp_states(
        self,
        accept_lengths: Any,
        stream: Any = None,
        *,
        state_indices: Any = None,
        positions: Any = None,
        store: Any = None,
        track_entries: Any = None,
        track_steps: Any = None,
    ) -> None:
        """Commit each row's accepted drafts by recomputing them from the replay stash.

        For every layer and row ``b < len(accept_lengths)``, ``a = accept_lengths[b]``, ``V`` the
        current verify length: if ``1 <= a <= V`` and the slot (``b``, or ``state_indices[b]``) is
        in ``[0, B)``, the slot's states advance by the stashed steps ``t = 0 .. a - 1`` in order,
        computed in float32 and stored to the state dtype after every step exactly as the
        sequential decode step stores it (Mamba2: ``h = h * dA_t + u_t * B_t``; Gated DeltaNet:
        ``S = S * g_t; pred = S^T k_t; S += k_t (beta_t (v_t - pred))``; the conv window becomes the
        last ``K`` columns of ``window ++ conv_0 .. conv_{a-1}``). A full accept ``a = V`` is
        committed too (the replay-mode verify pass never writes the main pools). Other rows, and
        slots no row names, are untouched; any int32 value is safe. Committing rows must name
        distinct slots. One launch covers every layer and both state kinds on the Numba backend.

        Args:
            accept_lengths: ``[active]`` int32, ``active`` at most the active batch of the current
                view (NumPy backend: a host array; Numba backend: a device array or host array).
            stream: the stream to run on (ignored by the NumPy backend).
            state_indices: optional ``[active]`` int32 pool slot of each row (keyword only).
            positions: optional ``[active]`` int32 (keyword only): tokens row ``b``'s main state had
                consumed before the verify pass, ``p``; the state after step ``t`` has consumed
                ``p + t + 1``. Required when ``Config.stochastic_rounding`` is on and the recurrent
                state is 16-bit (each step's store is keyed by that position); ignored otherwise.
            store: a [`mamba_cache.prefix.PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] of this manager whose
                entries receive tracked checkpoints (keyword only; give all three tracking arguments or none).
            track_entries: ``[active]`` int32, the store entry (from ``store.reserve()``) row ``b``
                checkpoints into; any value outside ``[0, P)`` tracks nothing.
            track_steps: ``[active]`` int32, the step whose state row ``b`` checkpoints, ``-1`` for
                none. In the same launch as the commit, entry ``track_entries[b]`` receives both
                kinds of the row's state after replayed step ``t = track_steps[b]`` (as stored) when
                the row commits and ``0 <= t < accept_lengths[b]``; a row that commits nothing
                tracks nothing.

        Raises:
            ValueError: the cache is not in replay mode (use ``scatter_mtp_states``), an array has
                the wrong rank / length / contiguity, ``positions`` is missing while the commit
                rounds stochastically, only some tracking arguments are given, ``store`` belongs to
                another manager, or (NumPy reference) two committing rows name one slot, two
                tracking rows name one entry or a tracking row names an entry that is not reserved;
                nothing changed.
            TypeError: an array is of the wrong kind or not int32, ``stream`` is of an unknown kind,
                or ``store`` is not a prefix store.
        """
        self._check_open("replay_mtp_states")
        self._tracking_given("replay_mtp_states", store, track_entries, track_steps)
        self._require_replay_mode("replay_mtp_states", "scatter_mtp_states")
        stream = self._stream(stream)
        if not self._stash:
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        checked_positions = self._positions("replay_mtp_states", positions, active, stream)
        track = None
        if store is not None:
            track = (store, *self._tracking("replay_mtp_states", store, track_entries, track_steps, active, stream))
        if active:
            seq_len = self._verify_shape[1]
            self._replay(accept, indices, active, seq_len, stream, positions=checked_positions, track=track)
            if store is not None:
                store.tracked_on(stream)

    @staticmethod
    def _tracking_given(what: str, store: Any, track_entries: Any, track_steps: Any) -> None:
        """Refuse a commit given some but not all of ``store``, ``track_entries`` and ``track_steps``."""
        tracking = {"store": store, "track_entries": track_entries, "track_steps": track_steps}
        given = [name for name, value in tracking.items() if value is not None]
        if given and len(given) != len(tracking):
            raise ValueError(
                f"{what}: store, track_entries and track_steps go together; got {', '.join(given)} only; "
                "nothing was changed"
            )

    def _require_replay_mode(self, what: str, instead: str) -> None:
        """Refuse a replay commit on a cache that keeps per-step states or a ring (naming the commit to use)."""
        self._refuse_in_checkpoint_mode(what)
        if self._pools is not None and self._config.commit_mode != "replay":
            raise ValueError(
                f"{what} needs Config.commit_mode='replay' (this cache keeps per-step states: use {instead}); "
                "nothing changed"
            )

    def _tracking(self, what: str, store: Any, track_entries: Any, track_steps: Any, active: int, stream: Any) -> tuple:
        """Check a commit's tracking arguments (the store, ``track_entries`` / ``track_steps`` ``[active]``).

        Returns:
            The checked ``(entries, steps)`` index arguments.
        """
        if not isinstance(store, EntryStore):
            raise TypeError(f"store must be a mamba_cache.prefix.PrefixStateCache, got {type(store).__name__}")
        store.check_tracking(self, what)
        checked = []
        for name, array in (("track_entries", track_entries), ("track_steps", track_steps)):
            values, (count,) = self._int32_array(name, array, "[active]", stream)
            if count != active:
                raise ValueError(f"{name} must have the length of accept_lengths ({active}), got {count}")
            checked.append(values)
        return tuple(checked)

    def replay_accepted_tree_states(
        self,
        accepted_node_ids: Any,
        accept_lengths: Any,
        state_indices: Any = None,
        stream: Any = None,
        *,
        positions: Any = None,
    ) -> None:
        """Tree verification in replay mode: replay each row's accepted path of tree nodes into its slot.

        The verify pass wrote each tree node's inputs into the stash (``[b, node]`` of the current ``[active, V]``
        view), each computed from its parent's state. Row ``b`` replays the nodes
        ``accepted_node_ids[b, :min(accept_lengths[b], max_accept_len)]`` in order (its accepted root-to-leaf path, as
        in [`replay_mtp_states`][mamba_cache.MambaCacheManagerBase.replay_mtp_states]); a row with no such node, any of
        them outside ``[0, V)`` (``-1`` included: a path has no holes), or a slot outside ``[0, B)`` is skipped. One
        launch covers every layer and both state kinds.

        Args:
            accepted_node_ids: ``[active, max_accept_len]`` int32 node ids in path order.
            accept_lengths: ``[active]`` int32, ``active`` at most the view's active batch.
            state_indices: optional ``[active]`` int32 pool slot of each row (default: row ``b``).
            stream: the stream to run on (ignored by the NumPy backend).
            positions: optional ``[active]`` int32 (keyword only), as in
                [`replay_mtp_states`][mamba_cache.MambaCacheManagerBase.replay_mtp_states]: the state after the ``t``-th
                node of the path has consumed ``positions[b] + t + 1`` tokens.

        Raises:
            ValueError: not in replay mode, wrong rank / rows / contiguity, ``accept_lengths`` longer
                than the view, ``positions`` missing while the commit rounds stochastically, or
                (NumPy reference) two committing rows naming one slot.
            TypeError: an array is of the wrong kind or not int32; or ``stream`` is of an unknown kind.
        """
        self._check_open("replay_accepted_tree_states")
        self._require_replay_mode("replay_accepted_tree_states", "scatter_accepted_tree_states")
        stream = self._stream(stream)
        if not self._stash:
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        nodes, shape = self._int32_array("accepted_node_ids", accepted_node_ids, "[active, max_accept_len]", stream)
        if shape[0] != active:
            raise ValueError(f"accepted_node_ids must have len(accept_lengths) = {active} rows, got {shape[0]}")
        checked_positions = self._positions("replay_accepted_tree_states", positions, active, stream)
        if active and shape[1]:
            seq_len = self._verify_shape[1]
            self._replay(accept, indices, active, seq_len, stream, nodes=nodes, positions=checked_positions)
