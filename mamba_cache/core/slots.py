"""The slot operations of the manager: clear, capture, copy, restore, save and load one slot or many.

A mixin of [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase] (documented there): each
operation checks its arguments (``core/checks.py``), then calls the backend's hooks
(``core/backend.py``).

In checkpoint mode a slot's current state is its checkpoint advanced through its ``h`` ring steps
(``core/checkpoint.py``): capture, save and ``copy_slots`` (as the source) read that folded state and
leave the source's checkpoint and ring as they are; clearing, restoring and copying into a slot
empty its ring (``h = 0``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .checks import check_index

KINDS = ("recurrent", "conv")


class SlotOperations:
    """Clearing, capturing, copying, restoring, saving and loading slots (every layer, both state kinds)."""

    def clear_states(self, stream: Any = None) -> None:
        """Zero every main recurrent and conv buffer (all layers, all slots).

        The intermediate buffers are left as they are (as in the C++). No-op with no layers. In
        checkpoint mode every slot's ring is emptied and its checkpoint position reset: ``h = 0``,
        ``p0 = 0`` (the zero state has consumed no tokens).

        Args:
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            TypeError: ``stream`` is of an unknown kind (Numba backend).
        """
        self._check_open("clear_states")
        stream = self._stream(stream)
        if self._pools is None:
            return
        self._zero_fill(self._pools.recurrent, self._pools.conv, stream)
        for pool in self._moving_pools()[2:]:  # 8-bit scales and residuals: zero too
            self._zero_fill(pool, pool, stream)
        if self._history:
            self._reset_checkpoints(None, np.zeros(self._config.max_batch_size, np.int64), stream)

    def capture_recurrent_states(self, batch_idx: int, stream: Any = None, *, out: Any = None) -> Any:
        """Copy one slot's recurrent state of every layer into new arrays, or into ``out``.

        In checkpoint mode the slot's current state (after ``p0 + h`` tokens, as ``current_state``).

        Args:
            batch_idx: the slot, in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).
            out: optional ``[L, 1, H, D, N]`` array of the recurrent dtype, C-contiguous, on the
                backend's device (keyword only). The copy goes there: nothing is allocated, so
                the call can be captured in a CUDA graph; reuse one ``out`` across calls.

        Returns:
            Without ``out``: one new array per layer, ``[1, H, D, N]``, recurrent dtype,
            independent of the pool (``[]`` with no layers). With ``out``: ``out`` itself.

        Raises:
            IndexError: ``batch_idx`` outside ``[0, B)``.
            TypeError: ``batch_idx`` is not an integer, ``stream`` is of an unknown kind, or
                ``out`` has another dtype or lives on the wrong device.
            ValueError: ``out`` has another shape or is not contiguous (nothing is copied).
        """
        return self._capture_kind("recurrent", batch_idx, stream, out)

    def capture_conv_states(self, batch_idx: int, stream: Any = None, *, out: Any = None) -> Any:
        """Copy one slot's conv state of every layer into new arrays, or into ``out``.

        Args:
            batch_idx: the slot, in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).
            out: optional ``[L, 1, C, K]`` array of the conv dtype (see
                ``capture_recurrent_states``; keyword only).

        Returns:
            Without ``out``: one new array per layer, ``[1, C, K]``, conv dtype (``[]`` with no
            layers). With ``out``: ``out`` itself.

        Raises:
            IndexError: ``batch_idx`` outside ``[0, B)``.
            TypeError: ``batch_idx`` is not an integer, ``stream`` is of an unknown kind, or
                ``out`` has another dtype or lives on the wrong device.
            ValueError: ``out`` has another shape or is not contiguous.
        """
        return self._capture_kind("conv", batch_idx, stream, out)

    def _capture_kind(self, kind: str, batch_idx: Any, stream: Any, out: Any = None) -> Any:
        self._check_open(f"capture_{kind}_states")
        stream = self._stream(stream)
        if self._pools is None:
            if out is not None:
                raise IndexError(f"capture_{kind}_states: this manager has no recurrent layers, nothing to copy")
            return []
        slot = check_index("batch_idx", batch_idx, self._config.max_batch_size)
        pool = getattr(self._pools, kind)
        if self._history:  # checkpoint mode: the folded state, as a one-slot [L, 1, ...] pool
            pool, slot = self._folded(slot, stream)[KINDS.index(kind)], 0
        if out is None:
            return self._split_layers(self._capture(pool, slot, stream))
        last = self._capture_outs.get(kind)
        if last is not None and last[0] is out:  # an engine reuses one buffer: checked once
            target = last[1]
        else:
            target = self._state_array("out", out, (pool.shape[0], 1, *pool.shape[2:]), pool.dtype)
            self._capture_outs[kind] = (out, target)
        self._capture_into(pool, slot, target, stream)
        return out

    def capture_scales(self, batch_idx: int, stream: Any = None) -> dict:
        """Copy one slot's 8-bit scales (and error-feedback residuals) of every layer into new arrays.

        What ``restore_slot(..., scales=...)`` takes back: with ``capture_recurrent_states`` and
        ``capture_conv_states`` it is the whole slot of an 8-bit cache.

        Args:
            batch_idx: the slot, in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).

        Returns:
            ``{"scales_recurrent": [L, 1, H, D], "scales_conv": [L, 1, ceil(C / 64), K],
            "residual_recurrent": [L, 1, H, D, N], "residual_conv": [L, 1, C, K]}``, the keys of
            the pools this cache has (``Config.scale_pools`` without the per-step ones); ``{}``
            for a cache without 8-bit states.

        Raises:
            IndexError: ``batch_idx`` outside ``[0, B)``, or no layers.
        """
        self._require_pools("capture_scales")
        stream = self._stream(stream)
        slot = check_index("batch_idx", batch_idx, self._config.max_batch_size)
        if self._history and self._scales:  # checkpoint mode: the folded state's scales (NumPy reference)
            self._folded(slot, stream)
            return {name: self._export(pool, pool.dtype) for name, pool in self._folded_scales.items()}
        return {
            name: self._capture(pool, slot, stream) for name, pool in self._scales.items() if "intermediate" not in name
        }

    def capture_states(self, batch_idx: int, stream: Any = None, *, out: tuple) -> tuple:
        """Copy one slot's recurrent AND conv states of every layer into caller-provided outputs.

        The engine form of ``capture_recurrent_states`` + ``capture_conv_states``: nothing is
        allocated, nothing synchronises, and on the Numba backend one launch copies both kinds of
        every layer, so the call can be captured in a CUDA graph (make one eager call first: it
        prepares the launch). Reuse one ``out`` pair across calls: it is checked once, and later
        calls with the same two objects only re-launch. The allocating ``capture_*_states``
        stay for the C++ API. In checkpoint mode: the slot's current (folded) state.

        Args:
            batch_idx: the slot, in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).
            out: ``(recurrent_out, conv_out)`` (keyword only): ``[L, 1, H, D, N]`` of the recurrent
                dtype and ``[L, 1, C, K]`` of the conv dtype, C-contiguous, on the backend's device
                (NumPy: host ``numpy.ndarray``; Numba: device arrays, anything with
                ``__cuda_array_interface__``, or anything with ``__dlpack__`` on the manager's GPU;
                a bfloat16 pool takes uint16 raw bits, or a DLPack bfloat16 tensor).

        Returns:
            ``out`` itself, holding slot ``batch_idx`` of every layer once the stream gets there.

        Raises:
            IndexError: ``batch_idx`` outside ``[0, B)``, or the manager has no layers.
            TypeError: ``batch_idx`` is not an integer, ``stream`` is of an unknown kind, ``out``
                is not a pair, or an output has another dtype or lives on the wrong device.
            ValueError: an output has another shape or is not contiguous, or the manager was
                closed or moved from. Both outputs are checked before anything is copied.
        """
        self._check_open("capture_states")
        stream = self._stream(stream)
        if self._pools is None:
            raise IndexError("capture_states: this manager has no recurrent layers, nothing to copy")
        slot = check_index("batch_idx", batch_idx, self._config.max_batch_size)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(
                "out must be a pair (recurrent_out, conv_out) of [L, 1, ...] arrays, got "
                f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, (tuple, list)) else ''}; "
                "nothing was copied"
            )
        last = self._capture_outs.get("both")
        if last is not None and last[0] is out[0] and last[1] is out[1]:  # an engine reuses its pair
            targets = last[2]
        else:
            targets = tuple(
                self._state_array(f"out[{i}]", array, (pool.shape[0], 1, *pool.shape[2:]), pool.dtype)
                for i, (array, pool) in enumerate(zip(out, (self._pools.recurrent, self._pools.conv), strict=True))
            )
            self._capture_outs["both"] = (out[0], out[1], targets)
        if self._history:
            self._capture_folded_into(slot, targets, stream)
            return out
        self._capture_pair_into(slot, targets, stream)
        return out

    def copy_slots(self, src_slots: Any, dst_slots: Any, stream: Any = None) -> None:
        """Copy whole slots: ``main[dst_slots[i]] = main[src_slots[i]]``, every layer, both state kinds.

        All pairs in one launch (no allocation, no synchronisation: graph-capturable when the
        arrays are on the device). A pair with either slot outside ``[0, B)`` is skipped (padding).
        The destinations must be distinct and none may also be a source. In checkpoint mode each
        destination receives its source's current (folded) state, ``p0 = src p0 + src h`` and
        ``h = 0``; the sources' checkpoints and rings are unchanged.

        Args:
            src_slots: ``[n]`` int32 source slots (NumPy backend: a host ``numpy.ndarray``; Numba
                backend: a device array, or a host one that is staged).
            dst_slots: ``[n]`` int32 destination slots, the same length.
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            TypeError: an array is of the wrong kind or not int32; or ``stream`` is of an unknown kind.
            ValueError: an array is not 1-D or not contiguous, the lengths differ, the manager was
                closed or moved from, or (NumPy reference) a destination repeats or is also a source.
        """
        self._check_open("copy_slots")
        stream = self._stream(stream)
        src, (count,) = self._int32_array("src_slots", src_slots, "[n]", stream)
        dst, (dst_count,) = self._int32_array("dst_slots", dst_slots, "[n]", stream)
        if dst_count != count:
            raise ValueError(f"dst_slots must have the length of src_slots ({count}), got {dst_count}")
        if self._pools is None or not count:
            return
        if self._history:
            self._copy_folded(src, dst, count, stream)
            return
        main = self._moving_pools()  # with any 8-bit scales and residuals, in the same call
        self._copy_rows(main, main, src, dst, count, stream)

    def clear_slot(self, slot: int, stream: Any = None) -> None:
        """Zero one slot of every layer's recurrent and conv state (a finished sequence).

        In checkpoint mode also ``h = 0`` and ``p0 = 0`` for the slot.

        Args:
            slot: in ``[0, B)``.
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            IndexError: ``slot`` outside ``[0, B)``; TypeError: not an integer, or a bad ``stream``.
        """
        self._check_open("clear_slot")
        stream = self._stream(stream)
        if self._pools is None:
            return
        index = check_index("slot", slot, self._config.max_batch_size)
        self._zero_slot(index, stream)
        if self._history:
            self._reset_checkpoints(np.array([index]), np.zeros(1, np.int64), stream)

    def restore_slot(
        self, slot: int, recurrent_states: Any, conv_states: Any, stream: Any = None, *, scales: Any = None
    ) -> None:
        """Copy captured states (e.g. a system-prompt snapshot) back into one slot of every layer.

        In checkpoint mode the states become the slot's checkpoint with an empty ring (``h = 0``);
        ``p0`` is kept: declare the state's token count with ``set_positions``.

        Args:
            slot: in ``[0, B)``.
            recurrent_states: a list of at most L arrays, ``[1, H, D, N]`` of the recurrent dtype, as
                ``capture_recurrent_states`` returns them (host arrays for NumPy, device arrays for
                Numba). Layers past the end of the list are zero-filled.
            conv_states: likewise, ``[1, C, K]`` of the conv dtype.
            stream: the stream to run on (ignored by the NumPy backend).
            scales: an 8-bit cache only, and required there (keyword only): the dict
                ``capture_scales`` returns, every key of it, each ``[L, 1, ...]`` (all layers:
                scales are never zero-filled, a short state list reads zeros whatever the scale).

        Raises:
            IndexError: ``slot`` outside ``[0, B)``.
            TypeError: a list is not a list/tuple, or an array has the wrong dtype or lives on the
                wrong device for this backend.
            ValueError: a list is longer than the layer count, or an array has the wrong shape;
                ``scales`` is missing, has other keys, or is given to a cache without 8-bit states.
        """
        stream = self._stream(stream)
        pools = self._require_pools("restore_slot")
        config = self._config
        slot = check_index("slot", slot, config.max_batch_size)
        checked = []
        for name, states, pool in (
            ("recurrent_states", recurrent_states, pools.recurrent),
            ("conv_states", conv_states, pools.conv),
        ):
            if not isinstance(states, (list, tuple)):
                raise TypeError(f"{name} must be a list of per-layer arrays, got {type(states).__name__}")
            if len(states) > config.num_recurrent_layers:
                raise ValueError(
                    f"{name} has {len(states)} arrays but the cache has {config.num_recurrent_layers} layers"
                )
            shape = (1, *pool.shape[2:])
            checked.append(
                (pool, [self._state_array(f"{name}[{i}]", a, shape, pool.dtype) for i, a in enumerate(states)])
            )
        main_scales = {name: pool for name, pool in self._scales.items() if "intermediate" not in name}
        if (scales is None) != (not main_scales) or (scales is not None and not isinstance(scales, dict)):
            raise ValueError(
                "scales must be the dict capture_scales returns for a cache with 8-bit states "
                f"(keys {sorted(main_scales)}) and None otherwise, got {type(scales).__name__}; nothing was changed"
            )
        if scales is not None:
            if sorted(scales) != sorted(main_scales):
                raise ValueError(
                    f"scales must have the keys {sorted(main_scales)}, got {sorted(scales)}; nothing was changed"
                )
            for name, pool in main_scales.items():
                shape = (pool.shape[0], 1, *pool.shape[2:])
                array = self._state_array(f"scales[{name!r}]", scales[name], shape, pool.dtype)
                checked.append((pool, [array[layer : layer + 1] for layer in range(pool.shape[0])]))
        self._zero_slot(slot, stream)  # the layers a short list leaves out
        for pool, states in checked:
            for layer, state in enumerate(states):
                self._write_slot(pool, layer, slot, state, stream)
        if self._history:
            self._reset_checkpoints(np.array([slot]), None, stream)

    def save_slot(self, path: Any, slot: int, stream: Any = None) -> None:
        """Save one slot of every layer, with the config and a checksum, to ``path`` (``.npz``).

        Raises:
            IndexError: ``slot`` outside ``[0, B)``, or no layers.
        """
        from ..snapshot import save_snapshot

        self._require_pools("save_slot")
        slot = check_index("slot", slot, self._config.max_batch_size)
        recurrent = self.capture_recurrent_states(slot, stream=stream)
        conv = self.capture_conv_states(slot, stream=stream)
        resolved = self._stream(stream)
        # a bfloat16 pool is uint16 raw bits on the Numba backend: view the host copies as bfloat16
        rec_dtype, conv_dtype = self._config.recurrent_state_dtype, self._config.conv_state_dtype
        scales = {
            name: self._to_host(array, resolved).view(self._config.scale_pools()[name][1])
            for name, array in self.capture_scales(slot, stream=stream).items()
        }
        save_snapshot(
            path,
            self._config,
            [self._to_host(a, resolved).view(rec_dtype) for a in recurrent],
            [self._to_host(a, resolved).view(conv_dtype) for a in conv],
            scales or None,
        )

    def load_slot(self, path: Any, slot: int, stream: Any = None) -> None:
        """Load a snapshot written by `save_slot` (by either backend) into one slot.

        Raises:
            mamba_cache.snapshot.SnapshotError: the file is corrupted, not a snapshot, or was saved
                from a config with other layer counts, shapes or dtypes (nothing is changed).
            IndexError: ``slot`` outside ``[0, B)``, or no layers.
        """
        from ..snapshot import load_snapshot

        self._require_pools("load_slot")
        check_index("slot", slot, self._config.max_batch_size)
        recurrent, conv, *scales = load_snapshot(path, self._config)
        resolved = self._stream(stream)
        self.restore_slot(
            slot,
            [self._from_host(a, resolved) for a in recurrent],
            [self._from_host(a, resolved) for a in conv],
            stream=stream,
            scales={name: self._from_host(a, resolved) for name, a in scales[0].items()} if scales else None,
        )
