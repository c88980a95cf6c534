"""The reading side of checkpoint mode on the device: a slot's state after ``steps`` ring steps, for a model's kernels.

A checkpoint-mode verify pass must read the state before window step ``t`` of a slot: its checkpoint advanced
through ring steps ``0 .. h + t - 1`` exactly as the fold advances it. These device functions compute that from
the checkpoint and the ring, with the replay commit's operations in its order and its rounding after every step
([`mamba_cache.replay.kernels`][mamba_cache.replay.kernels]: ``mamba2_update``, ``gdn_column_step``,
``round_state``; a stochastic rounding at ring step ``j`` keyed by the position ``p0 + j + 1``), so what a model
reads is bit for bit the state the fold will store. They are the Numba counterpart of
[`state_after`][mamba_cache.checkpoint.reference.state_after]; a model's step kernel calls the one of its mixer
in place of loading the state element (or column) from the pool:

```text
mamba2_element_after(checkpoint [H, D, N], dA [R, H], u [R, H, D], B [R, G, N], steps, i, d, n, ...)  -> float32
gdn_column_after(s, checkpoint [H, D, N], g [R, H], beta [R, H], k [R, G, D], v [R, H, N], steps, i, e, ...)
conv_element_after(window [C, K], columns [R, C], steps, c, k)                       -> the pool element
```

(one slot's views: ``get_recurrent_state(layer)[s]``, ``get_history(layer)[name][s]``). The rounding arguments
``mode, exp_bits, man_bits, half`` are the state's store format (`rounding_args`). The kernels below run them
over a batch of rows (``states_after``: scratch copies of the rows' states, as the tiny models use them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, float32

from ..precision.kernels import float32_bits, load_float32, store_formats
from ..replay.kernels import MAX_KEY_DIM, gdn_column_step, mamba2_update, round_state

__all__ = ["conv_element_after", "gdn_column_after", "mamba2_element_after", "rounding_args", "states_after"]


def rounding_args(config: Any) -> tuple[int, int, int, int, int, int, int]:
    """``(mode, exp_bits, man_bits, half, bits16, seed_lo, seed_hi)``: the recurrent state's store format and seed.

    ``half``: a float16 state rounded to nearest; ``bits16``: a bfloat16 pool of raw uint16 bits (Numba).
    """
    dtype = config.recurrent_state_dtype
    mode, exp_bits, man_bits, bits16 = (int(x) for x in store_formats(config, dtype, dtype)[:4])
    half = int(dtype.name == "float16" and mode == 0)
    seed = config.rounding_seed
    return mode, exp_bits, man_bits, half, bits16, seed & 0xFFFFFFFF, seed >> 32


@cuda.jit(device=True, inline=True)
def mamba2_element_after(
    checkpoint, decays, inputs, projections, steps, i, d, n, group, p0, layer, mode, exp_bits, man_bits, half, bits16,
    seed_lo, seed_hi,
):  # fmt: skip
    """Element ``(i, d, n)`` of a slot's Mamba2 state after ``steps`` ring steps past its checkpoint, as float32.

    ``checkpoint`` ``[H, D, N]`` (the slot's main pool row, raw bfloat16 bits with ``bits16``); the slot's ring
    ``decays`` ``[R, H]`` (``dA``), ``inputs`` ``[R, H, D]`` (``u``), ``projections`` ``[R, G, N]`` (``B``);
    ``group`` = ``i // (H / G)``; ``p0`` the checkpoint's token count. Per ring step ``j``:
    ``h = round(fma(u[j, i, d], B[j, group, n], h * dA[j, i]))``, the rounding keyed by element
    ``(i * D + d) * N + n`` and position ``p0 + j + 1``. ``steps = 0`` gives the checkpoint.
    """
    dim, size = checkpoint.shape[1], checkpoint.shape[2]
    element = (i * dim + d) * size + n
    h = load_float32(checkpoint[i, d, n], bits16)
    for j in range(steps):
        new = mamba2_update(h, decays[j, i], inputs[j, i, d], projections[j, group, n])
        h = round_state(new, mode, exp_bits, man_bits, half, element, np.int64(p0) + j + 1, layer, seed_lo, seed_hi)
    return h


@cuda.jit(device=True, inline=True)
def gdn_column_after(
    s, checkpoint, decays, strengths, keys, values, steps, i, j, e, p0, layer, mode, exp_bits, man_bits, half, bits16,
    seed_lo, seed_hi,
):  # fmt: skip
    """Column ``S_i[:, e]`` of a slot's Gated DeltaNet state after ``steps`` ring steps, into ``s`` (float32).

    ``s``: a float32 local array of at least D values; ``checkpoint`` ``[H, D, N]``; the slot's ring ``decays``
    ``[R, H]`` (``g``), ``strengths`` ``[R, H]`` (``beta``), ``keys`` ``[R, G, D]`` (``k``), ``values``
    ``[R, H, N]`` (``v``); ``j`` = ``i // (H / G)``. Per ring step the replay's ``gdn_column_step`` (decay,
    the prediction chain over d ascending, the delta-rule write), then every element rounded, keyed by
    ``(i * D + d) * N + e`` and position ``p0 + step + 1``.
    """
    dim, size = checkpoint.shape[1], checkpoint.shape[2]
    for d in range(dim):
        s[d] = load_float32(checkpoint[i, d, e], bits16)
    for t in range(steps):
        gdn_column_step(s, dim, decays[t, i], strengths[t, i], values[t, i, e], keys[t, j], 0)
        position = np.int64(p0) + t + 1
        for d in range(dim):
            s[d] = round_state(
                s[d], mode, exp_bits, man_bits, half, (i * dim + d) * size + e, position, layer, seed_lo, seed_hi
            )


@cuda.jit(device=True, inline=True)
def conv_element_after(window, columns, steps, c, k):
    """Element ``(c, k)`` of a slot's conv window after ``steps`` ring steps: ``(window ++ columns)[c, steps + k]``.

    ``window`` ``[C, K]`` (the checkpoint's), ``columns`` ``[R, C]`` (the ring's ``conv``); returned as the pool
    holds it (never rounded).
    """
    width = window.shape[1]
    p = steps + k
    if p < width:
        return window[c, p]
    return columns[p - width, c]


@cuda.jit
def _mamba2_rows(rec, decays, inputs, projections, slots, steps, p0, groups, out, layer, fmt):
    """``out[r] = `` slot ``slots[r]``'s state after ``steps[r]`` ring steps; grid ``(n, ceil(H*D*N / threads))``."""
    r = cuda.blockIdx.x
    x = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = rec.shape[1], rec.shape[2], rec.shape[3]
    if x >= heads * dim * size:
        return
    i, d, n = x // (dim * size), (x // size) % dim, x % size
    slot = slots[r]
    h = mamba2_element_after(
        rec[slot], decays[slot], inputs[slot], projections[slot], steps[r], i, d, n, i // (heads // groups), p0[r],
        layer, fmt[0], fmt[1], fmt[2], fmt[3], fmt[4], fmt[5], fmt[6],
    )  # fmt: skip
    if fmt[4]:
        out[r, i, d, n] = float32_bits(h) >> np.uint32(16)
    else:
        out[r, i, d, n] = h


@cuda.jit
def _gdn_rows(rec, decays, strengths, keys, values, slots, steps, p0, groups, out, layer, fmt):
    """``out[r] = `` slot ``slots[r]``'s state after ``steps[r]`` ring steps; grid ``(n, ceil(H*N / threads))``."""
    r = cuda.blockIdx.x
    x = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = rec.shape[1], rec.shape[2], rec.shape[3]
    if x >= heads * size:
        return
    i, e = x // size, x % size
    slot = slots[r]
    s = cuda.local.array(MAX_KEY_DIM, float32)
    gdn_column_after(
        s, rec[slot], decays[slot], strengths[slot], keys[slot], values[slot], steps[r], i, i // (heads // groups), e,
        p0[r], layer, fmt[0], fmt[1], fmt[2], fmt[3], fmt[4], fmt[5], fmt[6],
    )  # fmt: skip
    for d in range(dim):
        if fmt[4]:
            out[r, i, d, e] = float32_bits(s[d]) >> np.uint32(16)
        else:
            out[r, i, d, e] = s[d]


@cuda.jit
def _conv_rows(conv, columns, slots, steps, out):
    """``out[r] = `` slot ``slots[r]``'s window after ``steps[r]`` ring steps; grid ``(n, ceil(C*K / threads))``."""
    r = cuda.blockIdx.x
    x = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    channels, width = conv.shape[1], conv.shape[2]
    if x >= channels * width:
        return
    c, k = x // width, x % width
    out[r, c, k] = conv_element_after(conv[slots[r]], columns[slots[r]], steps[r], c, k)


def states_after(config: Any, recurrent: Any, conv: Any, history: dict, slots: Any, steps: Any, p0: Any, layer: int):
    """New device arrays ``(recurrent [n, H, D, N], conv [n, C, K])``: each row's slot after its ring steps, one layer.

    Args:
        config: the cache's config (checkpoint mode).
        recurrent: the layer's ``[B, H, D, N]`` pool (``get_recurrent_state``).
        conv: the layer's ``[B, C, K]`` pool.
        history: the layer's ring views (``get_history``), ``[B, R, ...]`` per field.
        slots: ``[n]`` int32 device array.
        steps: ``[n]`` int32 device array, each in ``[0, R]``.
        p0: ``[n]`` int64 device array, each slot's checkpoint position.
        layer: the layer index (a stochastic rounding's key).
    """
    count = slots.shape[0]
    out_rec = cuda.device_array((count, *recurrent.shape[1:]), dtype=recurrent.dtype)
    out_conv = cuda.device_array((count, *conv.shape[1:]), dtype=conv.dtype)
    if not count:
        return out_rec, out_conv
    fmt = cuda.to_device(np.array(rounding_args(config), dtype=np.int64))
    heads, dim, size = recurrent.shape[1:]
    if config.mixer == "mamba2":
        units, kernel = heads * dim * size, _mamba2_rows
        fields = (history["dA"], history["u"], history["B"])
    else:
        units, kernel = heads * size, _gdn_rows
        fields = (history["g"], history["beta"], history["k"], history["v"])
    threads = 64
    kernel[(count, -(-units // threads)), threads](recurrent, *fields, slots, steps, p0, config.n_groups, out_rec,
                                                   layer, fmt)  # fmt: skip
    units = conv.shape[1] * conv.shape[2]
    _conv_rows[(count, -(-units // threads)), threads](conv, history["conv"], slots, steps, out_conv)
    return out_rec, out_conv
