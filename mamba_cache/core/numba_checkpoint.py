"""Checkpoint mode on the Numba backend: the hooks of ``core/backend.py`` bound to ``mamba_cache.checkpoint.kernels``.

A mixin of [`NumbaMambaCacheManager`][mamba_cache.NumbaMambaCacheManager]. The ring, ``h`` (int32 ``[B]``) and
``p0`` (int64 ``[B]``) live on the device. A commit is two prepared launches (``plan_commit``, then the fold:
the replay kernel with the ring as its stash), reading its per-row fold lengths from a device buffer allocated
on the first call, so it neither synchronises nor allocates afterwards (CUDA-graph capturable). Every read of a
slot's current state (``copy_slots``, capture, the prefix store) copies the checkpoint into the destination and
replays the source's ``h`` ring steps there (``plan_read``, then the replay kernel without write-back): the
source's checkpoint and ring are never written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ..checkpoint import kernels as ckpt
from ..precision.quant8 import SLOT_SCALE_POOLS
from ..replay.kernels import THREADS
from . import numba_quant8
from .device import Launch, device_pointer
from .launch import DeviceArg


class CheckpointBinding:
    """``_checkpoint_commit``, ``_materialize``, ``_folded``, ``_copy_folded``, ``_reset_checkpoints`` on the device."""

    def _ckpt_buffer(self, name: str, size: int, dtype: Any = np.int32) -> DeviceArg:
        """A device scratch array of at least ``size`` entries kept by the manager (grown, never shrunk)."""
        key = ("checkpoint_buffer", name)
        buffer = self._launches.get(key)
        if buffer is None or buffer.array.size < size:
            array = cuda.device_array(max(size, self._config.max_batch_size, 1), dtype=dtype)
            buffer = self._launches[key] = DeviceArg(array, device_pointer(array), array.shape)
        return buffer

    def _ckpt_counters(self) -> tuple[DeviceArg, DeviceArg]:
        """``h`` and ``p0`` as launch arguments."""
        return tuple(
            DeviceArg(a, device_pointer(a), a.shape) for a in (self._history_lengths, self._checkpoint_positions)
        )

    def _ckpt_kernel(self, key: str, kernel: Any, args: tuple) -> Any:
        """A prepared launch of one of the counter kernels, made once with ``args`` (re-pointed per call)."""
        launch = self._launches.get(("checkpoint", key))
        if launch is None:
            launch = self._launches[("checkpoint", key)] = Launch(kernel, args, THREADS)
        return launch

    def _ckpt_replay(self, write_back: bool) -> tuple:
        """(launch, x blocks, layers) of the fold (``write_back``) or of a read, over the main pools and the ring."""
        key = ("checkpoint", "fold" if write_back else "read")
        entry = self._launches.get(key)
        if entry is None:
            positions = self._ckpt_buffer("fold_start", 0, np.int64).array if write_back else self._checkpoint_positions
            entry = self._launches[key] = ckpt.fold_launch(
                self._pools, self._history, self._config, self._placeholder().array, Launch, positions, write_back
            )
        return entry

    # ------------------------------------------------------------ the commit and materialize
    def _plan_and_fold(
        self, accept: Any, indices: Any, rows: int, seq_len: int, force: bool, stream: Any, track: Any = None
    ) -> None:
        config = self._config
        h, p0 = self._ckpt_counters()
        fold_len, fold_start = self._ckpt_buffer("fold_len", rows), self._ckpt_buffer("fold_start", 0, np.int64)
        track_len, track_step = self._ckpt_buffer("track_len", rows), self._ckpt_buffer("track_step", rows)
        placeholder = self._placeholder()
        plan = self._ckpt_kernel(
            "plan_commit",
            ckpt.plan_commit,
            (placeholder.array, placeholder.array, 0, 0, 1, config.max_intermediate_seq_len, config.history_len, 0,
             h.array, p0.array, fold_len.array, fold_start.array, placeholder.array, 0, placeholder.array,
             placeholder.array),
        )  # fmt: skip
        plan.set_array("accept_lengths", placeholder if accept is None else accept, shape_changes=True)
        plan.set_array("state_indices", placeholder if indices is None else indices, shape_changes=True)
        plan.set_scalar("use_indices", int(indices is not None))
        plan.set_scalar("rows", rows)
        plan.set_scalar("seq_len", seq_len)
        plan.set_scalar("force", int(force))
        plan.set_array("fold_len", fold_len, shape_changes=True)
        plan.set_scalar("use_tracking", int(track is not None))
        if track is not None:
            plan.set_array("track_steps", track[2], shape_changes=True)
            plan.set_array("track_len", track_len, shape_changes=True)
            plan.set_array("track_step", track_step, shape_changes=True)
        plan.launch(ckpt.rows_grid(rows), stream)
        if track is not None:  # the tracked states, read from the checkpoints before the fold moves them
            store, entries, _ = track
            self._replay_read(store.entry_pools, indices, track_len, track_step, entries, rows, fold_start, stream)
        if self._config.quantised_kinds:  # an 8-bit recurrent state: its own kernels, values and scales
            numba_quant8.replay(self, fold_len, indices, rows, config.history_len, stream, None, fold_start, ring=True)
            return
        launch, blocks, layers = self._ckpt_replay(True)
        launch.set_array("accept_lengths", fold_len, shape_changes=True)
        self._set_indices(launch, indices)
        launch.set_scalar("seq_len", config.history_len)
        launch.launch((blocks, rows, layers), stream)

    def _checkpoint_commit(
        self, accept: Any, indices: Any, active: int, seq_len: int, stream: Any, track: Any = None
    ) -> None:
        self._plan_and_fold(accept, indices, active, seq_len, False, stream, track)

    def _materialize(self, slots: Any, count: int, stream: Any) -> None:
        self._plan_and_fold(None, slots, count, 0, True, stream)

    # ------------------------------------------------------------ reads of the current state
    def _read_into(self, targets: tuple, src: Any, dst: Any, count: int, reset_dst: bool, stream: Any) -> None:
        """Replay each pair's source ring (``h`` steps) onto its destination row of ``targets``, already the checkpoint.

        ``targets``: ``(recurrent, conv)`` stacks ``[L, X, ...]`` of the pools' dtypes; ``src`` / ``dst``:
        DeviceArgs of ``count`` pairs, or ints (one pair).
        """
        h, p0 = self._ckpt_counters()
        read = [self._ckpt_buffer(name, count) for name in ("read_src", "read_len", "read_step", "read_entry")]
        placeholder = self._placeholder()
        plan = self._ckpt_kernel(
            "plan_read",
            ckpt.plan_read,
            (placeholder.array, placeholder.array, 0, 0, 0, 0, 1, 0, h.array, p0.array, *(r.array for r in read)),
        )
        rows = isinstance(src, DeviceArg)
        plan.set_array("src_rows", src if rows else placeholder, shape_changes=True)
        plan.set_array("dst_rows", dst if rows else placeholder, shape_changes=True)
        plan.set_scalar("use_rows", int(rows))
        plan.set_scalar("src_row", 0 if rows else int(src))
        plan.set_scalar("dst_row", 0 if rows else int(dst))
        plan.set_scalar("count", count)
        plan.set_scalar("dst_bound", targets[0].shape[1])
        plan.set_scalar("reset_dst", int(reset_dst))
        for name, buffer in zip(("read_src", "read_len", "read_step", "read_entry"), read, strict=True):
            plan.set_array(name, buffer, shape_changes=True)
        plan.launch(ckpt.rows_grid(count), stream)
        self._replay_read(targets, *read, count, p0, stream)

    def _replay_read(
        self, targets: tuple, slots: Any, length: Any, step: Any, entry: Any, rows: int, positions: Any, stream: Any
    ) -> None:
        """The read launch: row ``i``'s state after ring step ``step[i]`` into row ``entry[i]`` of ``targets``.

        Row ``i`` replays ``length[i]`` ring steps of its slot (``slots[i]``, or ``i`` for None); nothing
        else is written. ``positions``: each slot's rounding base (``p0``, or ``fold_start`` in a commit).
        """
        if self._config.quantised_kinds:  # targets: every pool of a slot (`_moving_pools` order), scales included
            track, seq_len = (targets, entry, step), self._config.history_len
            numba_quant8.replay(self, length, slots, rows, seq_len, stream, None, positions, ring=True,
                                write_back=False, track=track)  # fmt: skip
            return
        launch, blocks, layers = self._ckpt_replay(False)
        launch.set_array("accept_lengths", length, shape_changes=True)
        self._set_indices(launch, slots)
        launch.set_scalar("seq_len", self._config.history_len)
        launch.set_array("positions", positions)
        self._point_tracking(launch, targets, entry, step)
        launch.set_scalar("use_tracking", 1)
        launch.launch((blocks, rows, layers), stream)

    def _folded(self, slot: int, stream: Any) -> tuple:
        pools = self._moving_pools()  # with an 8-bit cache's scales and residuals
        outs = tuple(self._empty((p.shape[0], 1, *p.shape[2:]), p.dtype, stream) for p in pools)
        self._capture_folded_into(slot, outs, stream)
        self._forget(outs)  # launches keyed on these new arrays: not kept
        config = self._config
        names = [n for n in SLOT_SCALE_POOLS if n in self._scales]
        self._folded_scales = dict(zip(names, outs[2:], strict=True))  # capture_scales reads them
        return tuple(
            self._export(out, getattr(config, f"{kind}_state_dtype"))
            for out, kind in zip(outs[:2], ("recurrent", "conv"), strict=True)
        )

    def _capture_folded_into(self, slot: int, targets: tuple, stream: Any) -> None:
        # the checkpoint into the outputs, then the ring onto them: no allocation, graph-capturable
        if self._config.quantised_kinds:  # 8-bit values mean nothing without their scales: one copy of all
            pools = self._moving_pools()
            targets = (*targets, *self._ckpt_scratch(pools[len(targets) :]))
            self._copy_rows(targets, pools, slot, 0, 1, stream)
        else:
            self._capture_pair_into(slot, targets, stream)
        self._read_into(targets, slot, 0, 1, False, stream)

    def _ckpt_scratch(self, pools: tuple) -> tuple:
        """Kept one-slot ``[L, 1, ...]`` device arrays for ``pools``: scales a capture computes but does not return."""
        key = ("checkpoint_scratch", len(pools))
        scratch = self._launches.get(key)
        if scratch is None:
            scratch = tuple(cuda.device_array((p.shape[0], 1, *p.shape[2:]), p.dtype) for p in pools)
            self._launches[key] = scratch
        return scratch

    def _copy_folded_into(self, targets: tuple, src: Any, dst: Any, count: int, stream: Any) -> None:
        main = self._moving_pools()[: len(targets)]
        self._copy_rows(targets, main, src, dst, count, stream)  # the checkpoints, then the rings onto them
        self._read_into(targets, src, dst, count, False, stream)

    def _copy_folded(self, src: Any, dst: Any, count: int, stream: Any) -> None:
        main = self._moving_pools()  # with an 8-bit cache's scales and residuals
        self._copy_rows(main, main, src, dst, count, stream)  # the checkpoints (the state of a source with h = 0)
        self._read_into(main, src, dst, count, True, stream)

    def _reset_checkpoints(self, slots: Any, positions: Any, stream: Any) -> None:
        h, p0 = self._ckpt_counters()
        placeholder = self._placeholder()
        launch = self._ckpt_kernel(
            "reset", ckpt.reset_counters, (placeholder.array, p0.array, 0, 0, 0, h.array, p0.array)
        )
        every = slots is None
        if every:
            count = self._config.max_batch_size
        elif isinstance(slots, DeviceArg):  # a checked device index array (restore_many)
            count = slots.shape[0]
            launch.set_array("slots", slots, shape_changes=True)
        else:
            count = int(slots.size)
            staged = self._stage("checkpoint_slots", np.ascontiguousarray(slots, dtype=np.int32), stream)
            launch.set_array("slots", DeviceArg(*staged, (count,)), shape_changes=True)
        if positions is not None and not every:
            buffer = self._ckpt_buffer("reset_positions", count, np.int64)
            if count:
                buffer.array[:count].copy_to_device(
                    np.ascontiguousarray(positions, dtype=np.int64), stream=stream.stream
                )
            launch.set_array("positions", buffer, shape_changes=True)
        launch.set_scalar("count", count)
        launch.set_scalar("every_slot", int(every))
        launch.set_scalar("use_positions", int(positions is not None))
        if count:
            launch.launch(ckpt.rows_grid(count), stream)
