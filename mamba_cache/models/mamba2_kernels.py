"""CUDA kernels of :class:`mamba_cache.models.mamba2.TinyMamba2`: its decode step on device arrays.

The same function as the NumPy decode step in :mod:`mamba_cache.models.mamba2`, reading and
writing the cache manager's tensors in place. One thread per output element; these kernels are
for correctness and for showing the cache in use, not tuned. Grids:

    embed        (n, M)            u[i, :] = embedding[tokens[i], :]
    rmsnorm      (n / 32,)         one thread per row
    matvec       (n, O)            out[i, o] (+)= sum_k u[i, k] * w[k, o], k in order
    conv_step    (n, C)            shift slot's conv window, append xBC_raw, xBC = silu(conv)
    ssm_step     (n, H*D)          h = dA h + dt x B over N, y = h.C + D x
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numba import cuda, float32

from ..core.numba_backend import SIMULATOR
from ..precision.kernels import float32_bits, load_float32, store_formats, stored_value


def _grid(rows: int, cols: int) -> tuple:
    """``((rows, column blocks), threads)``: up to 128 threads, a multiple of 32 covering ``cols``."""
    threads = min(128, -(-cols // 32) * 32)
    return (rows, -(-cols // threads)), threads


@cuda.jit
def embed(tokens, table, u):
    """``u[i, :] = table[tokens[i], :]``; grid ``(n, ceil(M / threads))``."""
    i = cuda.blockIdx.x
    j = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if j < u.shape[1]:
        u[i, j] = table[tokens[i], j]


@cuda.jit
def rmsnorm(u, out):
    """``out[i, :] = u[i, :] / sqrt(mean(u[i, :]**2) + 1e-5)``; one thread per row, grid ``(ceil(n / 32),)``."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= u.shape[0]:
        return
    width = u.shape[1]
    acc = float32(0.0)
    for k in range(width):
        acc += u[i, k] * u[i, k]
    scale = float32(1.0) / math.sqrt(acc / float32(width) + float32(1e-5))
    for k in range(width):
        out[i, k] = u[i, k] * scale


@cuda.jit
def matvec(u, weight, out, accumulate):
    """``out[i, o] = (out[i, o] if accumulate else 0) + sum_k u[i, k] * weight[k, o]``, k ascending."""
    i = cuda.blockIdx.x
    o = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if o >= out.shape[1]:
        return
    acc = float32(0.0)
    for k in range(u.shape[1]):
        acc += u[i, k] * weight[k, o]
    if accumulate:
        out[i, o] = out[i, o] + acc
    else:
        out[i, o] = acc


@cuda.jit
def conv_step(conv, z, weight, bias, slots, xbc, inter, step, positions, fmt, layer, seed_lo, seed_hi):
    """Causal conv1d update of one layer, in place; grid ``(n, ceil(C / threads))``.

    ``conv`` ``[B, C, K]`` (state dtype), ``z`` ``[n, C + H]`` (xBC_raw first), ``weight`` ``[C, K]``,
    ``bias`` ``[C]``, ``slots`` ``[n]``, ``xbc`` ``[n, C]`` float32 out; if ``step >= 0`` the
    new window also goes to ``inter[slots[i], step]`` (``[active, V, C, K]``). Stores round as
    ``fmt`` (``[8]`` int32, :func:`mamba_cache.precision.kernels.store_formats`) says, keyed by
    ``positions[i] + 1`` tokens, ``layer`` and the seed halves.
    """
    i = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if c >= conv.shape[1]:
        return
    slot = slots[i]
    kernel = conv.shape[2]
    for k in range(kernel - 1):
        conv[slot, c, k] = conv[slot, c, k + 1]
    position = np.int64(positions[i]) + 1
    new = stored_value(z[i, c], fmt[0], fmt[1], fmt[2], c * kernel + kernel - 1, position, layer, 1, seed_lo, seed_hi)
    if fmt[3]:  # bfloat16: raw bits
        conv[slot, c, kernel - 1] = float32_bits(new) >> np.uint32(16)
    else:
        conv[slot, c, kernel - 1] = new
    acc = float32(0.0)
    for k in range(kernel):
        acc += load_float32(conv[slot, c, k], fmt[3]) * weight[c, k]
    v = acc + bias[c]
    xbc[i, c] = v / (float32(1.0) + math.exp(-v))
    if step >= 0:
        same = fmt[1] == fmt[5] and fmt[2] == fmt[6]
        for k in range(kernel):
            if same:
                inter[slot, step, c, k] = conv[slot, c, k]
            else:
                value = load_float32(conv[slot, c, k], fmt[3])
                out = stored_value(value, fmt[4], fmt[5], fmt[6], c * kernel + k, position, layer, 1, seed_lo, seed_hi)
                if fmt[7]:
                    inter[slot, step, c, k] = float32_bits(out) >> np.uint32(16)
                else:
                    inter[slot, step, c, k] = out


@cuda.jit
def ssm_step(rec, xbc, z, dt_bias, a_log, d_skip, slots, y, inter, step, positions, fmt, layer, seed_lo, seed_hi):
    """Selective state update of one layer, in place; grid ``(n, ceil(H*D / threads))``.

    ``rec`` ``[B, H, D, N]`` (state dtype), ``xbc`` ``[n, C]``, ``z`` ``[n, C + H]`` (dt_raw last),
    ``dt_bias``/``a_log``/``d_skip`` ``[H]`` (``a_log`` holds A itself), ``y`` ``[n, H*D]`` float32
    out; if ``step >= 0`` the new state also goes to ``inter[slots[i], step]``. Stores round as in
    :func:`conv_step`.
    """
    i = cuda.blockIdx.x
    hd = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, state = rec.shape[1], rec.shape[2], rec.shape[3]
    if hd >= heads * dim:
        return
    h, d = hd // dim, hd % dim
    slot = slots[i]
    channels = xbc.shape[1]
    raw = z[i, channels + h] + dt_bias[h]
    dt = raw if raw > float32(20.0) else float32(math.log1p(math.exp(raw)))
    decay = float32(math.exp(dt * a_log[h]))
    x = xbc[i, hd]
    dtx = dt * x
    width = heads * dim
    acc = float32(0.0)
    position = np.int64(positions[i]) + 1
    for n in range(state):
        new = decay * load_float32(rec[slot, h, d, n], fmt[3]) + dtx * xbc[i, width + n]
        element = hd * state + n
        kept = stored_value(new, fmt[0], fmt[1], fmt[2], element, position, layer, 0, seed_lo, seed_hi)
        if fmt[3]:
            rec[slot, h, d, n] = float32_bits(kept) >> np.uint32(16)
        else:
            rec[slot, h, d, n] = kept
        if step >= 0:
            kept = stored_value(new, fmt[4], fmt[5], fmt[6], element, position, layer, 0, seed_lo, seed_hi)
            if fmt[7]:
                inter[slot, step, h, d, n] = float32_bits(kept) >> np.uint32(16)
            else:
                inter[slot, step, h, d, n] = kept
        acc += new * xbc[i, width + state + n]
    y[i, hd] = acc + d_skip[h] * x


class NumbaTinyMamba2:
    """The device side of a :class:`~mamba_cache.models.mamba2.TinyMamba2`: weights and decode step."""

    def __init__(self, model) -> None:
        self.model = model
        self.weights = {name: cuda.to_device(np.ascontiguousarray(value)) for name, value in model.weights.items()}

    def _decode(self, cache, tokens: np.ndarray, slots: np.ndarray, step, positions: np.ndarray):
        # A tiny model launches tiny grids on purpose: Numba's low-occupancy warning says nothing here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Grid size .* will likely result in GPU under-utilization")
            return self._decode_layers(cache, tokens, slots, step, positions)

    def _decode_layers(self, cache, tokens: np.ndarray, slots: np.ndarray, step, positions: np.ndarray):
        config, w = self.model.config, self.weights
        n = tokens.shape[0]
        width = config.recurrent_state_num_heads * config.recurrent_state_head_dim
        channels = config.conv_dim
        d_tokens, d_slots = cuda.to_device(tokens), cuda.to_device(slots)
        d_positions = cuda.to_device(np.ascontiguousarray(positions, dtype=np.int32))
        seed = config.rounding_seed
        seed_lo, seed_hi = seed & 0xFFFFFFFF, seed >> 32
        conv_fmt = cuda.to_device(store_formats(config, config.conv_state_dtype, config.intermediate_conv_state_dtype))
        rec_fmt = cuda.to_device(
            store_formats(config, config.recurrent_state_dtype, config.intermediate_recurrent_state_dtype)
        )
        u = cuda.device_array((n, width), dtype=np.float32)
        normed = cuda.device_array((n, width), dtype=np.float32)
        z = cuda.device_array((n, channels + config.recurrent_state_num_heads), dtype=np.float32)
        xbc = cuda.device_array((n, channels), dtype=np.float32)
        y = cuda.device_array((n, width), dtype=np.float32)
        grid, threads = _grid(n, width)
        embed[grid, threads](d_tokens, w["embedding"], u)
        with_step = step is not None
        for layer in range(config.num_recurrent_layers):
            rmsnorm[-(-n // 32), 32](u, normed)
            grid, threads = _grid(n, z.shape[1])
            matvec[grid, threads](normed, w["in_proj"][layer], z, False)
            # without a step the kernels never touch `inter`; any array of the right rank will do
            conv_state, rec_state = cache.get_conv_state(layer), cache.get_recurrent_state(layer)
            inter_conv = (
                cache.get_intermediate_conv_state(layer) if with_step else conv_state.reshape((1, *conv_state.shape))
            )
            grid, threads = _grid(n, channels)
            conv_step[grid, threads](
                conv_state,
                z,
                w["conv_weight"][layer],
                w["conv_bias"][layer],
                d_slots,
                xbc,
                inter_conv,
                step if with_step else -1,
                d_positions,
                conv_fmt,
                layer,
                seed_lo,
                seed_hi,
            )
            inter_rec = (
                cache.get_intermediate_recurrent_state(layer) if with_step else rec_state.reshape((1, *rec_state.shape))
            )
            grid, threads = _grid(n, width)
            ssm_step[grid, threads](
                rec_state,
                xbc,
                z,
                w["dt_bias"][layer],
                w["A"][layer],
                w["D"][layer],
                d_slots,
                y,
                inter_rec,
                step if with_step else -1,
                d_positions,
                rec_fmt,
                layer,
                seed_lo,
                seed_hi,
            )
            matvec[grid, threads](y, w["out_proj"][layer], u, True)
        return u


__all__ = ["NumbaTinyMamba2", "SIMULATOR"]
