"""Checkpoint mode on the device: the counter kernels of the commit and of the reads, and the fold's launches.

The fold itself is the replay commit's kernel family ([`mamba_cache.replay.tiled`][mamba_cache.replay.tiled]) built
with the history ring as its stash ([`stash_row_rule`][mamba_cache.replay.tiles.stash_row_rule]: a row reads the ring
of its slot, ``slot * R + j``, and its ``positions`` entry is the slot's), so every element sees the replay commit's
operations in the same order, and a stochastic rounding at ring step ``j`` is keyed by the token position
``p0 + j + 1``. What this module adds is the bookkeeping, done on the device so that a commit neither synchronises
with the host nor allocates (CUDA-graph capturable):

```text
checkpoint_mtp_states:  plan_commit   (one thread per row)   h' = h + a; fold when h' + S > R:
                                      fold_len[b] = h', fold_start[s] = p0, p0 += h', h = 0;
                                      else fold_len[b] = 0, h = h'
                        fold          (the replay kernel, ring rule, write back)   accept_lengths = fold_len,
                                      positions = fold_start: rows of length 0 do nothing
reads (copy, capture):  plan_read     (one thread per pair)  read_len[i] = h[src], read_step[i] = h[src] - 1,
                                      read_entry[i] = dst; with reset_dst: p0[dst] = p0[src] + h[src], h[dst] = 0
                        read          (the replay kernel, ring rule, no write back)   the state after
                                      read_len steps is the tracked state of step read_len - 1, stored into the
                                      destination row; the source's checkpoint and ring are not written
```

A read first copies the source's checkpoint into the destination (the plain row copy), so a source with
``h = 0`` (no step to replay) leaves the checkpoint there. ``reset_counters`` sets ``h`` (and ``p0``) of listed
slots, for ``set_positions``, ``clear_*`` and ``restore_slot``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from ..core.rows import accepted_steps, row_slot
from ..replay import tiled
from ..replay.kernels import THREADS

__all__ = ["fold_launch", "plan_commit", "plan_read", "reset_counters", "rows_grid"]


def rows_grid(rows: int) -> tuple:
    """The grid of a one-thread-per-row kernel of this module: ``(ceil(rows / THREADS), 1, 1)``."""
    return (max(1, -(-rows // THREADS)), 1, 1)


@cuda.jit
def plan_commit(
    accept_lengths,
    state_indices,
    use_indices,
    rows,
    seq_len,
    window,
    ring,
    force,
    h,
    p0,
    fold_len,
    fold_start,
    track_steps,
    use_tracking,
    track_len,
    track_step,
):
    """The counters of ``checkpoint_mtp_states`` (or, with ``force``, ``materialize``), one thread per row.

    Row ``b < rows`` with ``a = accept_lengths[b]`` in ``[1, seq_len]`` (with ``force``: ``a = 0``, every
    row) and slot ``s`` (``state_indices[b]`` with ``use_indices``, else ``b``) in ``[0, B)``:
    ``h' = h[s] + a``, ``fold_start[s] = p0[s]``; if ``force`` or ``h' + window > ring`` then
    ``fold_len[b] = h'``, ``p0[s] += h'``, ``h[s] = 0``, else ``fold_len[b] = 0``, ``h[s] = h'``. Any
    other row gets ``fold_len[b] = 0``. With ``use_tracking``, a row whose ``t = track_steps[b]``
    is in ``[0, a)`` gets ``track_len[b] = h[s] + t + 1`` and ``track_step[b] = h[s] + t`` (the
    ring step whose state it checkpoints), every other row ``0`` and ``-1``.

    Grid `rows_grid` ``(rows)``, block ``(THREADS,)``.
    """
    b = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if b >= rows:
        return
    fold_len[b] = 0
    if use_tracking:
        track_len[b] = 0
        track_step[b] = -1
    accepted = 0 if force else accepted_steps(accept_lengths, b, seq_len)
    slot = row_slot(state_indices, use_indices, b, h.shape[0])
    if (accepted == 0 and not force) or slot < 0:
        return
    before = h[slot]
    after = before + accepted
    fold_start[slot] = p0[slot]
    if use_tracking:
        t = track_steps[b]
        if t >= 0 and t < accepted:
            track_len[b] = before + t + 1
            track_step[b] = before + t
    if force or after + window > ring:
        fold_len[b] = after
        p0[slot] = p0[slot] + after
        h[slot] = 0
    else:
        h[slot] = after


@cuda.jit
def plan_read(
    src_rows, dst_rows, use_rows, src_row, dst_row, count, dst_bound, reset_dst, h, p0, read_src, read_len, read_step,
    read_entry,
):  # fmt: skip
    """The counters of a read of pair ``i < count``: source slot ``s``, destination row ``d``, one thread per pair.

    ``s, d = src_rows[i], dst_rows[i]`` with ``use_rows``, else the scalars ``src_row, dst_row``.
    ``read_src[i] = s``; with ``s`` in ``[0, B)`` and ``d`` in ``[0, dst_bound)``: ``read_len[i] =
    h[s]``, ``read_step[i] = h[s] - 1``, ``read_entry[i] = d`` and, with ``reset_dst`` (a copy into
    the slots), ``p0[d] = p0[s] + h[s]``, ``h[d] = 0``; otherwise ``0, -1, -1``. A destination
    must not also be a source (the caller's rule), so no source's counters change.

    Grid `rows_grid` ``(count)``, block ``(THREADS,)``.
    """
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= count:
        return
    src = src_rows[i] if use_rows else src_row
    dst = dst_rows[i] if use_rows else dst_row
    read_src[i] = src
    read_len[i] = 0
    read_step[i] = -1
    read_entry[i] = -1
    if src < 0 or src >= h.shape[0] or dst < 0 or dst >= dst_bound:
        return
    steps = h[src]
    if steps > 0:
        read_len[i] = steps
        read_step[i] = steps - 1
        read_entry[i] = dst
    if reset_dst:
        p0[dst] = p0[src] + steps
        h[dst] = 0


@cuda.jit
def reset_counters(slots, positions, count, every_slot, use_positions, h, p0):
    """``h[s] = 0`` and, with ``use_positions``, ``p0[s] = positions[i]``, for ``s = slots[i]`` and ``i < count``.

    A slot outside ``[0, B)`` is skipped (padding).

    With ``every_slot``: ``s = i`` for every slot (``count = B``) and ``p0[s] = 0`` when ``use_positions``.
    Grid `rows_grid` ``(count)``, block ``(THREADS,)``.
    """
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= count:
        return
    slot = i if every_slot else slots[i]
    if slot < 0 or slot >= h.shape[0]:  # padding
        return
    h[slot] = 0
    if use_positions:
        p0[slot] = 0 if every_slot else positions[i]


def fold_launch(
    pools: Any, history: dict, config: Any, placeholder: Any, launch_class: type, positions: Any, write_back: bool
) -> tuple:
    """(launch, x blocks, layers) of the replay kernel of ``config.mixer`` with the history ring as its stash.

    ``write_back``: the fold (each row's slot advances in place); without it, a read (the tracked state goes to
    the tracking entry, the slot stays). ``positions``: the int64 ``[B]`` device array of each slot's
    stochastic-rounding base (``fold_start``, or ``p0`` itself for a read), bound with ``use_positions`` 1.
    Each call re-points ``accept_lengths``, the indices, ``seq_len`` (= ``R``) and the tracking arrays as for
    the replay commit ([`mamba_cache.replay.tiled.prepare`][mamba_cache.replay.tiled.prepare]).
    """
    if positions.dtype != np.int64:
        raise TypeError(f"positions must be int64, got {positions.dtype}")
    return tiled.prepare(
        pools, history, config, placeholder, launch_class, ring=True, write_back=write_back, positions=positions
    )
