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
from ..replay.kernels import mamba2_update


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
def conv_step(conv, z, weight, bias, slots, xbc, inter, step, stash_col, stash_step):
    """Causal conv1d update of one layer, in place; grid ``(n, ceil(C / threads))``.

    ``conv`` ``[B, C, K]`` (state dtype), ``z`` ``[n, C + H]`` (xBC_raw first), ``weight`` ``[C, K]``,
    ``bias`` ``[C]``, ``slots`` ``[n]``, ``xbc`` ``[n, C]`` float32 out; if ``step >= 0`` the
    new window also goes to ``inter[slots[i], step]`` (``[active, V, C, K]``); if ``stash_step >= 0``
    the input column (the window's last, in the conv dtype) goes to ``stash_col[slots[i], stash_step]``
    (``[active, V, C]``, the replay stash).
    """
    i = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if c >= conv.shape[1]:
        return
    slot = slots[i]
    kernel = conv.shape[2]
    for k in range(kernel - 1):
        conv[slot, c, k] = conv[slot, c, k + 1]
    conv[slot, c, kernel - 1] = z[i, c]
    acc = float32(0.0)
    for k in range(kernel):
        acc += float32(conv[slot, c, k]) * weight[c, k]
    v = acc + bias[c]
    xbc[i, c] = v / (float32(1.0) + math.exp(-v))
    if step >= 0:
        for k in range(kernel):
            inter[slot, step, c, k] = conv[slot, c, k]
    if stash_step >= 0:
        stash_col[slot, stash_step, c] = conv[slot, c, kernel - 1]


@cuda.jit
def ssm_step(rec, xbc, z, dt_bias, a_log, d_skip, slots, y, inter, step, stash_da, stash_u, stash_b, stash_step):
    """Selective state update of one layer, in place; grid ``(n, ceil(H*D / threads))``.

    ``rec`` ``[B, H, D, N]`` (state dtype), ``xbc`` ``[n, C]``, ``z`` ``[n, C + H]`` (dt_raw last),
    ``dt_bias``/``a_log``/``d_skip`` ``[H]`` (``a_log`` holds A itself), ``y`` ``[n, H*D]`` float32
    out; if ``step >= 0`` the new state also goes to ``inter[slots[i], step]``; if ``stash_step >= 0``
    the step's inputs go to the replay stash ``stash_da [active, V, H]``, ``stash_u [active, V, H, D]``,
    ``stash_b [active, V, 1, N]`` at ``[slots[i], stash_step]``.

    The state update is the replay kernel's own device function,
    ``h = mamba2_update(h, dA, u, B) = fma(u, B, h * dA)``, so a replay commit reproduces this
    step bit for bit on the GPU.
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
    dtx = float32(dt * x)
    width = heads * dim
    if stash_step >= 0:
        if d == 0:
            stash_da[slot, stash_step, h] = decay
        stash_u[slot, stash_step, h, d] = dtx
        if hd == 0:
            for n in range(state):
                stash_b[slot, stash_step, 0, n] = xbc[i, width + n]
    acc = float32(0.0)
    for n in range(state):
        new = mamba2_update(float32(rec[slot, h, d, n]), decay, dtx, xbc[i, width + n])
        rec[slot, h, d, n] = new
        if step >= 0:
            inter[slot, step, h, d, n] = new
        acc += new * xbc[i, width + state + n]
    y[i, hd] = acc + d_skip[h] * x


class NumbaTinyMamba2:
    """The device side of a :class:`~mamba_cache.models.mamba2.TinyMamba2`: weights and decode step."""

    def __init__(self, model) -> None:
        self.model = model
        self.weights = {name: cuda.to_device(np.ascontiguousarray(value)) for name, value in model.weights.items()}

    def _decode(self, cache, tokens: np.ndarray, slots: np.ndarray, step, scratch=None):
        # A tiny model launches tiny grids on purpose: Numba's low-occupancy warning says nothing here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Grid size .* will likely result in GPU under-utilization")
            return self._decode_layers(cache, tokens, slots, step, scratch)

    def _verify_replay(self, cache, draft_tokens: np.ndarray) -> None:
        """Replay-mode verify: advance device copies of the rows' states, write the stash (see TinyMamba2.verify)."""
        active = draft_tokens.shape[0]
        scratch = []
        for layer in range(self.model.config.num_recurrent_layers):
            copies = []
            for state in (cache.get_recurrent_state(layer), cache.get_conv_state(layer)):
                copy = cuda.device_array((active, *state.shape[1:]), dtype=state.dtype)
                copy.copy_to_device(state[:active])
                copies.append(copy)
            scratch.append(tuple(copies))
        for t in range(draft_tokens.shape[1]):
            self._decode(cache, np.ascontiguousarray(draft_tokens[:, t]), np.arange(active), t, scratch)

    def _decode_layers(self, cache, tokens: np.ndarray, slots: np.ndarray, step, scratch=None):
        config, w = self.model.config, self.weights
        n = tokens.shape[0]
        width = config.recurrent_state_num_heads * config.recurrent_state_head_dim
        channels = config.conv_dim
        d_tokens, d_slots = cuda.to_device(tokens), cuda.to_device(slots)
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
            if scratch is None:
                conv_state, rec_state = cache.get_conv_state(layer), cache.get_recurrent_state(layer)
            else:
                rec_state, conv_state = scratch[layer]
            replay_step = with_step and scratch is not None
            stash = cache.get_replay_stash(layer) if replay_step else None
            inter_step = with_step and not replay_step
            inter_conv = (
                cache.get_intermediate_conv_state(layer) if inter_step else conv_state.reshape((1, *conv_state.shape))
            )
            stash_col = stash["conv"] if replay_step else conv_state
            grid, threads = _grid(n, channels)
            conv_step[grid, threads](
                conv_state,
                z,
                w["conv_weight"][layer],
                w["conv_bias"][layer],
                d_slots,
                xbc,
                inter_conv,
                step if inter_step else -1,
                stash_col,
                step if replay_step else -1,
            )
            inter_rec = (
                cache.get_intermediate_recurrent_state(layer)
                if inter_step
                else rec_state.reshape((1, *rec_state.shape))
            )
            # without a stash step the kernel never touches these; any float32 arrays of the right rank do
            stash_da, stash_u, stash_b = (
                (stash["dA"], stash["u"], stash["B"])
                if replay_step
                else (z.reshape((n, z.shape[1], 1)), y.reshape((n, 1, 1, width)), y.reshape((n, 1, 1, width)))
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
                step if inter_step else -1,
                stash_da,
                stash_u,
                stash_b,
                step if replay_step else -1,
            )
            matvec[grid, threads](y, w["out_proj"][layer], u, True)
        return u


__all__ = ["NumbaTinyMamba2", "SIMULATOR"]
