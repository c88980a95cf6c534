"""Checkpoint mode's part of the manager: the history ring, the counters, the commit and the folds.

A mixin of [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase] (documented there). In
``Config.commit_mode="checkpoint"`` the main pools hold each slot's checkpoint, the state after
``p0`` tokens, and a ring of ``R = Config.history_len`` steps holds the replay stash of the ``h``
accepted steps past it; the verify pass writes window step ``t`` of a row at ring step ``h + t``
of its slot. Each public method checks every argument (``core/checks.py``) before it calls the
backend's hook (``core/backend.py``); the arithmetic is
[`mamba_cache.checkpoint.reference`][mamba_cache.checkpoint.reference].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .checks import check_index, pad_slot_id


class CheckpointOperations:
    """The history ring's views and counters, ``checkpoint_mtp_states``, ``materialize`` and ``current_state``."""

    def _require_checkpoint_mode(self, what: str) -> None:
        """Refuse a checkpoint-mode operation on a cache in another mode (or with no layers)."""
        self._require_pools(what)
        if self._config.commit_mode != "checkpoint":
            raise ValueError(
                f"{what} needs Config.commit_mode='checkpoint' (this cache has commit_mode="
                f"{self._config.commit_mode!r}); nothing changed"
            )

    def has_history(self) -> bool:
        """True when the history ring is allocated (``commit_mode='checkpoint'`` with layers)."""
        return bool(self._history)

    def get_history(self, recurrent_layer_idx: int) -> dict:
        """The history ring of one layer: field name to a ``[B, R, ...]`` view, indexed by slot and ring step.

        The verify pass writes window step ``t`` of row ``b`` (slot ``s``) at ``[s, h_s + t]``, ``h_s``
        from ``history_lengths()``. The fields are the replay stash's (``Config.replay_stash_fields``):
        Mamba2 ``dA [H]``, ``u [H, D]``, ``B [G, N]`` float32; Gated DeltaNet ``g [H]``, ``beta [H]``,
        ``k [G, D]``, ``v [H, N]`` float32; both ``conv [C]`` in the conv dtype. The views never change
        with ``reshape_intermediate_states``.

        Raises:
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
            ValueError: the cache is not in checkpoint mode, or was closed / moved from.
        """
        self._require_checkpoint_mode("get_history")
        index = check_index("recurrent_layer_idx", recurrent_layer_idx, self._config.num_recurrent_layers)
        key = ("history", index)
        views = self._view_cache.get(key)
        if views is None:
            config = self._config
            views = {}
            for name, (shape, dtype) in config.replay_stash_fields.items():
                view = self._history[name][index].reshape(config.max_batch_size, config.history_len, *shape)
                views[name] = self._export(view, dtype)
            self._view_cache[key] = views
        return views

    def history_lengths(self, stream: Any = None) -> np.ndarray:
        """A host copy of ``h``: each slot's ring steps past its checkpoint, int32 ``[B]``, in ``[0, R - S]``.

        Raises:
            IndexError: no layers. ValueError: not in checkpoint mode, or closed / moved from.
        """
        self._require_checkpoint_mode("history_lengths")
        return np.array(self._to_host(self._history_lengths, self._stream(stream)), dtype=np.int32)

    def checkpoint_positions(self, stream: Any = None) -> np.ndarray:
        """A host copy of ``p0``: the tokens each slot's checkpoint has consumed, int64 ``[B]``.

        The slot's current state has consumed ``p0 + h`` tokens.

        Raises:
            IndexError: no layers. ValueError: not in checkpoint mode, or closed / moved from.
        """
        self._require_checkpoint_mode("checkpoint_positions")
        return np.array(self._to_host(self._checkpoint_positions, self._stream(stream)), dtype=np.int64)

    def set_positions(self, slots: Any, positions: Any, stream: Any = None) -> None:
        """Declare the token count of some slots' checkpoints: ``p0[slots] = positions``, ``h[slots] = 0``.

        For a slot whose main state was written from outside (a prefill, ``restore_slot``): its ring
        is then empty and its stochastic-rounding keys count from ``positions``.

        Args:
            slots: ``[n]`` int32 host ``numpy.ndarray``, distinct, in ``[0, B)``; a row naming
                ``pad_slot_id`` (-1) is padding and sets nothing.
            positions: ``[n]`` int64 host ``numpy.ndarray``, each ``>= 0``.
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            TypeError: an argument is not a host ``numpy.ndarray`` of its dtype.
            ValueError: not 1-D, lengths differ, a slot out of range or repeated, a negative
                position, or not in checkpoint mode; nothing changed.
        """
        self._require_checkpoint_mode("set_positions")
        stream = self._stream(stream)
        checked = []
        for name, array, dtype in (("slots", slots, np.int32), ("positions", positions, np.int64)):
            if not isinstance(array, np.ndarray):
                raise TypeError(
                    f"{name} must be a host numpy.ndarray of {np.dtype(dtype).name}, got {type(array).__name__}"
                )
            if array.dtype != dtype:
                raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {array.dtype.name}")
            if array.ndim != 1:
                raise ValueError(f"{name} must be 1-D [n], got shape {array.shape}")
            checked.append(array.astype(np.int64))
        slot_values, position_values = checked
        if position_values.size != slot_values.size:
            raise ValueError(
                f"positions must have the length of slots ({slot_values.size}), got {position_values.size}"
            )
        keep = slot_values != pad_slot_id  # padding rows set nothing
        slot_values, position_values = slot_values[keep], position_values[keep]
        batch = self._config.max_batch_size
        if ((slot_values < 0) | (slot_values >= batch)).any():
            bad = int(slot_values[(slot_values < 0) | (slot_values >= batch)][0])
            raise ValueError(f"slots must be in [0, {batch}) or pad_slot_id (-1), got {bad}; nothing changed")
        if np.unique(slot_values).size != slot_values.size:
            raise ValueError(f"slots must be distinct, got {slot_values.tolist()}; nothing changed")
        if (position_values < 0).any():
            raise ValueError(f"positions must be >= 0, got {int(position_values.min())}; nothing changed")
        if slot_values.size:
            self._reset_checkpoints(slot_values, position_values, stream)

    def checkpoint_mtp_states(
        self,
        accept_lengths: Any,
        stream: Any = None,
        *,
        state_indices: Any = None,
        store: Any = None,
        track_entries: Any = None,
        track_steps: Any = None,
    ) -> None:
        """Commit each row's accepted drafts in checkpoint mode: count them, and fold when the ring is full.

        For every row ``b < len(accept_lengths)``, ``a = accept_lengths[b]``, slot ``s`` (``b``, or
        ``state_indices[b]``), ``V`` the current verify length, ``S`` ``max_intermediate_seq_len``,
        ``R`` ``history_len``: rows with ``a <= 0``, ``a > V`` or ``s`` outside ``[0, B)`` are
        untouched. Otherwise ``h' = h[s] + a``; if ``h' + S > R`` (the ring could not hold another
        window) the checkpoint FOLDS: it advances through ring steps ``0 .. h' - 1`` as the replay
        commit advances a slot (float32, stored to the state dtype after every step, stochastic
        rounding at ring step ``j`` keyed by position ``p0 + j + 1``), then ``p0 += h'`` and ``h = 0``;
        else ``h = h'`` and no state byte moves. Committing rows must name distinct slots; any
        int32 value is otherwise safe. On the Numba backend: no allocation after the first call and
        no host synchronisation (graph-capturable).

        Args:
            accept_lengths: ``[active]`` int32, ``active`` at most the active batch of the current view.
            stream: the stream to run on (ignored by the NumPy backend).
            state_indices: optional ``[active]`` int32 pool slot of each row (keyword only).
            store: a [`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] of this manager whose reserved
                entries receive tracked checkpoints (keyword only; give all three tracking arguments or none).
            track_entries: ``[active]`` int32, the store entry (from ``store.reserve()``) row ``b``
                checkpoints into; any value outside ``[0, P)`` tracks nothing.
            track_steps: ``[active]`` int32, the window step whose state row ``b`` checkpoints, ``-1``
                for none. A committing row with ``0 <= t = track_steps[b] < a`` writes into entry
                ``track_entries[b]`` both kinds of its slot's state after ring step ``h + t`` (the
                state after ``p0 + h + t + 1`` tokens, computed as the fold computes it), whether or
                not the commit folds; the ring is never copied into the store.

        Raises:
            ValueError: the cache is not in checkpoint mode (naming the commit to use), an array has
                the wrong rank / length / contiguity, only some tracking arguments are given, ``store``
                belongs to another manager, or (NumPy reference) two committing rows name one slot,
                two tracking rows name one entry or a tracking row names an entry that is not
                reserved; nothing changed.
            TypeError: an array is of the wrong kind or not int32, ``stream`` is of an unknown kind,
                or ``store`` is not a prefix store.
        """
        self._check_open("checkpoint_mtp_states")
        self._tracking_given("checkpoint_mtp_states", store, track_entries, track_steps)
        if self._pools is not None and self._config.commit_mode != "checkpoint":
            instead = "replay_mtp_states" if self._config.commit_mode == "replay" else "scatter_mtp_states"
            raise ValueError(
                f"checkpoint_mtp_states needs Config.commit_mode='checkpoint' (this cache has commit_mode="
                f"{self._config.commit_mode!r}: use {instead}); nothing changed"
            )
        stream = self._stream(stream)
        if not self._history:
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        track = None
        if store is not None:
            what = "checkpoint_mtp_states"
            track = (store, *self._tracking(what, store, track_entries, track_steps, active, stream))
        if active:
            self._checkpoint_commit(accept, indices, active, self._verify_shape[1], stream, track)
            if store is not None:
                store.tracked_on(stream)

    def materialize(self, slots: Any, stream: Any = None) -> None:
        """Fold the given slots now: each checkpoint advances through its ``h`` ring steps, then ``p0 += h``, ``h = 0``.

        The arithmetic is the commit's fold; a slot with ``h = 0`` is unchanged. Afterwards the
        main pools (``get_recurrent_state``) hold those slots' current state. A slot outside
        ``[0, B)`` is skipped (padding).

        Args:
            slots: ``[n]`` int32 slots (NumPy backend: a host ``numpy.ndarray``).
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            ValueError: not in checkpoint mode, not 1-D / contiguous, or (NumPy reference) a slot
                repeats; nothing changed.
            TypeError: ``slots`` is of the wrong kind or not int32.
        """
        self._require_checkpoint_mode("materialize")
        stream = self._stream(stream)
        checked, (count,) = self._int32_array("slots", slots, "[n]", stream)
        if count:
            self._materialize(checked, count, stream)

    def current_state(self, slot: int, stream: Any = None) -> tuple[list, list]:
        """One slot's current state of every layer, as new arrays (any commit mode).

        In checkpoint mode the state after ``p0 + h`` tokens: the checkpoint advanced through the
        ``h`` ring steps (the fold's arithmetic), the pools unchanged; in the other modes the main
        pools' state.

        Args:
            slot: in ``[0, B)``.
            stream: the stream to run on (ignored by the NumPy backend).

        Returns:
            ``(recurrent, conv)``: lists of one array per layer, ``[1, H, D, N]`` of the recurrent
            dtype and ``[1, C, K]`` of the conv dtype.

        Raises:
            IndexError: ``slot`` outside ``[0, B)``, or no layers.
            TypeError: ``slot`` is not an integer.
        """
        self._require_pools("current_state")
        slot = check_index("slot", slot, self._config.max_batch_size)
        resolved = self._stream(stream)
        if not self._history:
            return self.capture_recurrent_states(slot, stream), self.capture_conv_states(slot, stream)
        recurrent, conv = self._folded(slot, resolved)
        return self._split_layers(recurrent), self._split_layers(conv)

    def _copy_current(self, targets: tuple, src: Any, dst: Any, count: int, stream: Any) -> None:
        """Rows ``dst`` of ``targets`` (stacks ``[L, X, ...]`` of `_moving_pools` kinds) = slots ``src``'s states.

        In checkpoint mode the folded states (``_copy_folded_into``: the source slots unchanged), else
        a row copy of the main pools. ``src`` / ``dst``: ints (one pair) or checked index arrays.
        """
        main = self._moving_pools()  # with an 8-bit cache's scales and residuals
        if self._history:
            self._copy_folded_into(targets, src, dst, count, stream)
        else:
            self._copy_rows(targets, main, src, dst, count, stream)

    def _positions_restored(self, slots: Any, lengths: Any, stream: Any) -> None:
        """After states were copied into ``slots`` (a prefix restore): ``p0 = lengths``, ``h = 0`` in checkpoint mode.

        ``slots``: an int, a host int array or (Numba) a checked device index array; a slot outside
        ``[0, B)`` is skipped. ``lengths``: host ints, one per slot.
        """
        if self._history:
            if isinstance(slots, (int, np.integer)):
                slots = np.array([slots], dtype=np.int32)
            self._reset_checkpoints(slots, np.asarray(lengths, dtype=np.int64).reshape(-1), stream)
