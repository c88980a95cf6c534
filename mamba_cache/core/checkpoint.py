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
        int32 value is otherwise safe.

        Args:
            accept_lengths: ``[active]`` int32, ``active`` at most the active batch of the current view.
            stream: the stream to run on (ignored by the NumPy backend).
            state_indices: optional ``[active]`` int32 pool slot of each row (keyword only).
            store: prefix-store tracking is not built yet for checkpoint mode: must be None.
            track_entries: must be None (as ``store``).
            track_steps: must be None (as ``store``).

        Raises:
            ValueError: the cache is not in checkpoint mode (naming the commit to use), a tracking
                argument is given, an array has the wrong rank / length / contiguity, or (NumPy
                reference) two committing rows name one slot; nothing changed.
            TypeError: an array is of the wrong kind or not int32, or ``stream`` is of an unknown kind.
        """
        self._check_open("checkpoint_mtp_states")
        if self._pools is not None and self._config.commit_mode != "checkpoint":
            instead = "replay_mtp_states" if self._config.commit_mode == "replay" else "scatter_mtp_states"
            raise ValueError(
                f"checkpoint_mtp_states needs Config.commit_mode='checkpoint' (this cache has commit_mode="
                f"{self._config.commit_mode!r}: use {instead}); nothing changed"
            )
        if store is not None or track_entries is not None or track_steps is not None:
            raise ValueError(
                "checkpoint_mtp_states: prefix tracking (store, track_entries, track_steps) is not built yet for "
                "commit_mode='checkpoint'; nothing changed"
            )
        stream = self._stream(stream)
        if not self._history:
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        if active:
            self._checkpoint_commit(accept, indices, active, self._verify_shape[1], stream)

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
