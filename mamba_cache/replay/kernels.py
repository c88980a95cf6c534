"""The replay commit's device building blocks: step functions, rounding, the row / slot / tracking rules.

The kernels the backend launches are built from these in ``mamba_cache.replay.tiled``; the tiny models'
Numba decode kernels call the same step functions, so replay equals the sequential decode step bit for
bit on the GPU. Every replay kernel sees the pools flat per slot and the stash fields flat per layer
(the verify pass wrote ``[active, V, ...]`` from the start of each layer, so row ``b``, step ``t`` is
stash row ``b * V + t``):

```text
rec     [L, B, H*D*N]      state dtype; element (i, d, n) at (i * D + d) * N + n
conv    [L, B, C*K]        conv dtype;  element (c, k) at c * K + k
stash   [L, B*S*elems]     float32 fields, conv column in the conv dtype

grid  = (chunks_rec + chunks_conv, rows, L),  block = (THREADS,)
blockIdx.z -> layer, blockIdx.y -> row b, blockIdx.x < chunks_rec -> a tile of the state,
else a tile of the conv channels.
```

Per element and step, in this order (float32, stored to the state dtype after every step exactly as the
decode step stores it: [`round_state`][mamba_cache.replay.kernels.round_state], float16 by the hardware's
``cvt.rn.f16.f32``, bfloat16 by round-to-nearest-even, stochastic rounding by the Philox bits of
`mamba_cache.precision` keyed by the position ``positions[b] + t + 1``):

```text
Mamba2   h = fma(u[i, d], B[j, n], h * dA[i])                  (mamba2_update)
GDN      S_i[d, e] = S_i[d, e] * g[i]                          (d = 0 .. D-1)
         pred = fma(S_i[d, e], k[j, d], pred)                  (d increasing, from 0: gdn_accumulate)
         delta = beta[i] * (v[i, e] - pred)
         S_i[d, e] = fma(k[j, d], delta, S_i[d, e])            (gdn_write)
conv     window[k] = (window ++ columns)[a + k], k increasing  (moved, never rounded)
```

A tree commit (``use_nodes``) replays stash rows ``b * V + node_ids[b, t]`` for ``t < min(a, M)``
instead of ``b * V + t`` (`_step`). Prefix-store tracking ("copy the state after step t to entry e")
is one more store inside a kernel's step loop (`_track`, `_track_conv`). The first replay kernels
(one element or column per thread), which the tiled ones replaced, live on as the tests' oracle
(``tests/replay_oracle.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numba import cuda, float32
from numba.cuda.cudadrv.error import CudaSupportError

from ..core.device import SIMULATOR
from ..core.rows import accepted_steps, row_slot, tracked_step, tree_steps
from ..precision.kernels import (
    bfloat16_rn_bits,
    float32_bits,
    float32_from_bits,
    store_formats,
    stored_value,
)

#: Threads per block: 128 on a GPU. The CUDA simulator runs every thread of a block as a Python
#: thread, so there a block is one warp (the same code and index math, four times fewer threads to
#: run through each barrier); the GPU test suite runs 128.
THREADS = 32 if SIMULATOR else 128
#: Largest Gated DeltaNet key dim D (a column's values in registers: at most ``MAX_KEY_DIM / 32`` parts of 32).
MAX_KEY_DIM = 256


@cuda.jit(device=True, inline=True)
def mamba2_update(h, dA, u, b):  # noqa: N803
    """One Mamba2 state element: ``fma(u, b, h * dA)`` (``h * dA`` rounded, then one fused multiply-add)."""
    return cuda.fma(u, b, h * dA)


@cuda.jit(device=True, inline=True)
def gdn_accumulate(pred, s, k):
    """One term of the GDN prediction: ``fma(s, k, pred)``."""
    return cuda.fma(s, k, pred)


@cuda.jit(device=True, inline=True)
def gdn_write(s, k, delta):
    """The GDN delta-rule write of one element: ``fma(k, delta, s)``."""
    return cuda.fma(k, delta, s)


@cuda.jit(device=True, inline=True)
def gdn_column_step(s, dim, decay, beta, value, keys, key_offset):
    """One Gated DeltaNet step of one state column ``s = S_i[:, e]`` (a float32 local array), in place.

    ``keys[key_offset + d]`` is ``k[j, d]``; ``value`` is ``v[i, e]``. Order of operations:

    ```text
    for d = 0 .. dim-1:  s[d] = s[d] * decay;  pred = fma(s[d], k[d], pred)     (pred starts at 0)
    delta = beta * (value - pred)
    for d = 0 .. dim-1:  s[d] = fma(k[d], delta, s[d])
    ```

    The tiny GDN model's decode kernel and the GDN replay kernel both call this, so they agree bit for bit.
    """
    pred = float32(0.0)
    for d in range(dim):
        s[d] = s[d] * decay
        pred = gdn_accumulate(pred, s[d], keys[key_offset + d])
    delta = beta * (value - pred)
    for d in range(dim):
        s[d] = gdn_write(s[d], keys[key_offset + d], delta)


@cuda.jit(device=True, inline=True)
def _replay_conv(conv, col, layer, slot, row, seq_len, accepted, c, channels, width, node_ids, use_nodes):
    """Channel ``c`` of the slot's conv window after ``accepted`` input columns, in place.

    ``window[k] = (window ++ col_0 .. col_{a-1})[a + k]`` for k increasing: position ``a + k >= k``
    is read before anything overwrites it, so no copy of the window is needed.
    """
    base = c * width
    for k in range(width):
        p = accepted + k
        if p < width:
            conv[layer, slot, base + k] = conv[layer, slot, base + p]
        else:
            step = _step(node_ids, use_nodes, row, seq_len, p - width)
            conv[layer, slot, base + k] = col[layer, step * channels + c]


@cuda.jit(device=True, inline=True)
def _step(node_ids, use_nodes, row, seq_len, t):
    """Stash row of the row's t-th replayed step: ``row * V + t``, or ``row * V + node_ids[row, t]`` (a tree)."""
    if use_nodes:
        return row * seq_len + node_ids[row, t]
    return row * seq_len + t


@cuda.jit(device=True, inline=True)
def _row_slot(accept_lengths, state_indices, use_indices, seq_len, slots, row, node_ids, use_nodes):
    """(steps, slot) of a row, or (0, -1) when the row commits nothing (padding, out of range).

    The commit row rule of `mamba_cache.core.rows`: a row replays ``a`` steps when ``1 <= a <= V``;
    a tree row (``use_nodes``) replays ``min(a, M)`` steps, the nodes ``node_ids[row, :min(a, M)]``,
    and is skipped unless every one of them is in ``[0, V)``.
    """
    if use_nodes:
        accepted = tree_steps(node_ids, accept_lengths, row, seq_len)
    else:
        accepted = accepted_steps(accept_lengths, row, seq_len)
    slot = row_slot(state_indices, use_indices, row, slots)
    if accepted == 0 or slot < 0:
        return 0, -1
    return accepted, slot


@cuda.jit(device=True, inline=True)
def round_state(h, mode, exp_bits, man_bits, half, element, position, layer, seed_lo, seed_hi):
    """A float32 state value ``h`` as its pool stores it, as a float32, computed in registers.

    ``half`` (a float16 pool, round to nearest even): ``cvt.rn.f16.f32`` then back, the very
    conversion the pool's store performs. Otherwise `mamba_cache.precision.kernels.stored_value`
    with the pool's ``(mode, exp_bits, man_bits)``: ``mode`` 0 returns ``h`` (float32 / float64
    pools keep it exactly), 1 is bfloat16's integer round to nearest even, 2 stochastic rounding
    keyed by ``(seed, layer, kind 0, position, element)``.
    """
    if half:
        return float32(np.float16(h))
    return stored_value(h, mode, exp_bits, man_bits, element, position, layer, 0, seed_lo, seed_hi)


@cuda.jit(device=True, inline=True)
def _store_word(h, bits16):
    """What a pool element receives for the (already rounded) float32 ``h``: a bfloat16 pool its raw bits."""
    if bits16:
        return float32_bits(h) >> np.uint32(16)
    return h


@cuda.jit(device=True, inline=True)
def _position(positions, use_positions, row, t):
    """Tokens the state after replayed step ``t`` of ``row`` has consumed: ``positions[row] + t + 1``."""
    if use_positions:
        return np.int64(positions[row]) + t + 1
    return np.int64(t + 1)


@cuda.jit(device=True, inline=True)
def _track(track_entries, track_steps, use_tracking, row, accepted, entries):
    """(step, entry) whose state the row checkpoints, or (-1, -1): ``0 <= t < a`` and entry in ``[0, P)``.

    `mamba_cache.core.rows.tracked_step` with ``a`` (at most V here) as the step bound.
    """
    if not use_tracking:
        return -1, -1
    return tracked_step(track_steps, track_entries, row, accepted, accepted, entries)


@cuda.jit(device=True, inline=True)
def _track_conv(conv, col, track_conv, entry, layer, slot, row, seq_len, t, c, channels, width, node_ids, use_nodes):
    """Channel ``c`` of the window after step ``t`` into store entry ``entry``: ``(window ++ cols)[t + 1 + k]``.

    Reads the slot's window before `_replay_conv` overwrites it.
    """
    base = c * width
    for k in range(width):
        p = t + 1 + k
        if p < width:
            track_conv[layer, entry, base + k] = conv[layer, slot, base + p]
        else:
            step = _step(node_ids, use_nodes, row, seq_len, p - width)
            track_conv[layer, entry, base + k] = col[layer, step * channels + c]


#: How a GDN replay kernel rounds its state after every step (a compile-time choice, see `rounding_of`).
ROUND_NONE, ROUND_HALF, ROUND_BF16, ROUND_STORED = 0, 1, 2, 3


def rounding_of(mode: int, half: int) -> int:
    """The GDN kernel's rounding for a pool's ``(mode, half)``: none, float16, bfloat16 nearest, or the general one."""
    if half:
        return ROUND_HALF
    return (ROUND_NONE, ROUND_BF16, ROUND_STORED)[mode]


@cuda.jit(device=True, inline=True)
def round_bfloat16(h):
    """``h`` rounded to the nearest even bfloat16, as a float32, in 32-bit registers.

    The integer shortcut of `mamba_cache.precision.kernels.convert_bits` (same bits; NaN quieted).
    """
    x = float32_bits(h)
    top = x & np.uint32(0x80000000)
    mag = x & np.uint32(0x7FFFFFFF)
    nan = np.uint32(0x7FC00000) | (mag & np.uint32(0xFFFF0000))
    rounded = (mag + np.uint32(0x7FFF) + ((mag >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return float32_from_bits(top | (nan if mag > np.uint32(0x7F800000) else rounded))  # a select, no branch


@cuda.jit(device=True, inline=True)
def round_bfloat16_hw(h):
    """`round_bfloat16` through the hardware's ``cvt.rn.bf16.f32`` (sm_80 and later): the same bits.

    IEEE round to nearest even is the integer shortcut for every non-NaN float32 (subnormals and
    overflow to infinity included); a NaN is selected to the shortcut's quiet NaN with the top
    payload bits. One conversion, a shift, a compare and a select, where the shortcut takes eight.
    """
    rounded = float32_from_bits(bfloat16_rn_bits(h) << np.uint32(16))
    if h != h:
        rounded = float32_from_bits((float32_bits(h) & np.uint32(0xFFFF0000)) | np.uint32(0x7FC00000))
    return rounded


def bfloat16_in_hardware() -> bool:
    """Whether kernels built now round to bfloat16 with ``cvt.rn.bf16.f32``: a GPU of compute capability 8.0 or up."""
    if SIMULATOR:
        return False
    try:
        return tuple(cuda.get_current_device().compute_capability) >= (8, 0)
    except CudaSupportError:  # no driver to ask: a compile for PTX only (the tests build sm_90 PTX on CPUs)
        return True


def _rounder(rounding: int) -> Any:
    """A device function rounding a float32 state value as ``rounding`` says.

    Its arguments are [`round_state`][mamba_cache.replay.kernels.round_state]'s; the cases ``rounding`` rules out are
    compiled away, so the d-loops that call it stay small enough for LLVM to unroll.
    """
    if rounding == ROUND_NONE:

        @cuda.jit(device=True, inline=True)
        def rounder(h, mode, exp_bits, man_bits, half, element, position, layer, seed_lo, seed_hi):
            return h

    elif rounding == ROUND_HALF:

        @cuda.jit(device=True, inline=True)
        def rounder(h, mode, exp_bits, man_bits, half, element, position, layer, seed_lo, seed_hi):
            return float32(np.float16(h))

    elif rounding == ROUND_BF16:
        to_bf16 = round_bfloat16_hw if bfloat16_in_hardware() else round_bfloat16

        @cuda.jit(device=True, inline=True)
        def rounder(h, mode, exp_bits, man_bits, half, element, position, layer, seed_lo, seed_hi):
            return to_bf16(h)

    else:

        @cuda.jit(device=True, inline=True)
        def rounder(h, mode, exp_bits, man_bits, half, element, position, layer, seed_lo, seed_hi):
            return round_state(h, mode, exp_bits, man_bits, half, element, position, layer, seed_lo, seed_hi)

    return rounder


class LaunchLayout(NamedTuple):
    """What every replay kernel's launch starts from (`launch_layout`)."""

    layers: int
    rec: Any  #: the recurrent pool as ``[L, B, H*D*N]``
    conv: Any  #: the conv pool as ``[L, B, C*K]``
    fields: tuple  #: the stash fields the mixer's kernel takes, in argument order
    mode: int  #: the state's store format: mode, exponent and mantissa bits, raw bfloat16 bits
    exp_bits: int
    man_bits: int
    bits16: int
    half: int  #: 1 for a float16 state rounded to nearest (the pool's own store rounds)
    rounding: int  #: the ``ROUND_*`` the kernels are built for


def launch_layout(pools: Any, config: Any) -> LaunchLayout:
    """The pools flattened per slot and the state's store format, for `prepare` and the tiled one."""
    layers, slots = config.num_recurrent_layers, config.max_batch_size
    rec = pools.recurrent.reshape(layers, slots, config.recurrent_slot_elems)
    conv = pools.conv.reshape(layers, slots, config.conv_slot_elems)
    dtype = config.recurrent_state_dtype
    mode, exp_bits, man_bits, bits16 = (int(x) for x in store_formats(config, dtype, dtype)[:4])
    half = int(dtype.name == "float16" and mode == 0)
    fields = ("dA", "u", "B") if config.mixer == "mamba2" else ("g", "beta", "k", "v")
    return LaunchLayout(layers, rec, conv, fields, mode, exp_bits, man_bits, bits16, half, rounding_of(mode, half))


def launch_args(lay: LaunchLayout, stash: dict, config: Any, chunks_rec: int, placeholder: Any) -> tuple:
    """The replay kernels' launch arguments, with no positions, indices, nodes or tracking bound (``use_*`` 0)."""
    seed = config.rounding_seed
    return (
        lay.rec,
        lay.conv,
        *(stash[name] for name in lay.fields),
        stash["conv"],
        chunks_rec,
        config.recurrent_state_num_heads,
        config.recurrent_state_head_dim,
        config.recurrent_state_size,
        config.n_groups,
        config.conv_dim,
        config.conv_kernel,
        lay.mode,
        lay.exp_bits,
        lay.man_bits,
        lay.bits16,
        lay.half,
        seed & 0xFFFFFFFF,
        seed >> 32,
        placeholder,
        0,
        placeholder,
        placeholder,
        0,
        1,
        placeholder.reshape((placeholder.size, 1)),
        0,
        lay.rec,  # tracking off: never written
        lay.conv,
        placeholder,
        placeholder,
        0,
    )
