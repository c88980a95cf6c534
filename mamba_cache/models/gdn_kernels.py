"""CUDA kernels of `mamba_cache.models.gdn.TinyGatedDeltaNet`: its decode step on device arrays.

The embedding, RMSNorm, projections and causal conv are `mamba_cache.models.mamba2_kernels`'
(the conv input is the first C columns of ``z`` in both models). Grids:

    gdn_gates    (n, max(H, 2G))   g, beta per value head; q, k L2-normalised per key head
    gdn_state    (n, H*N)          one thread per state column (i, e): the replay's own
                                   gdn_column_step, then o[i, e] = sum_d S[i, d, e] * q[j, d]
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from ..precision.kernels import store_formats
from ..replay.kernels import MAX_KEY_DIM, gdn_column_step
from .chunked_kernels import chunk_cumsum, gdn_checkpoints, gdn_chunk_out, gdn_solve, gdn_state_passing, gdn_wu
from .mamba2_kernels import NumbaTinyMamba2, _grid, conv_step, embed, matvec, rmsnorm


@cuda.jit
def gdn_gates(z, xbc, dt_bias, a, groups, dim, g, beta, qk):
    """Gates and normalised keys of one layer; grid ``(n, ceil(max(H, 2G) / threads))``.

    ``z`` ``[n, C + 2H]``, ``xbc`` ``[n, C]`` (silu(conv)), ``dt_bias``/``a`` ``[H]`` (``a`` < 0);
    out: ``g``, ``beta`` ``[n, H]`` float32, ``qk`` ``[n, 2*G*D]`` (q heads then k heads, each
    ``x / sqrt(sum_d x[d]**2 + 1e-6)``, d ascending).
    """
    i = cuda.blockIdx.x
    t = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads = g.shape[1]
    channels = xbc.shape[1]
    if t < heads:
        raw = z[i, channels + t] + dt_bias[t]
        dt = raw if raw > float32(20.0) else float32(math.log1p(math.exp(raw)))
        g[i, t] = float32(math.exp(a[t] * dt))
        beta[i, t] = float32(1.0) / (float32(1.0) + float32(math.exp(-z[i, channels + heads + t])))
    if t < 2 * groups:
        base = t * dim
        acc = float32(0.0)
        for d in range(dim):
            acc += xbc[i, base + d] * xbc[i, base + d]
        scale = float32(1.0) / math.sqrt(acc + float32(1e-6))
        for d in range(dim):
            qk[i, base + d] = xbc[i, base + d] * scale


@cuda.jit
def gdn_state(rec, qk, xbc, g, beta, groups, slots, o, inter, step, stash_g, stash_beta, stash_k, stash_v, stash_step):
    """Delta-rule state update of one layer, in place; grid ``(n, ceil(H*N / threads))``.

    ``rec`` ``[B, H, D, N]`` (state dtype); thread ``(i, e)`` advances column ``S_i[:, e]`` with
    [`mamba_cache.replay.kernels.gdn_column_step`][mamba_cache.replay.kernels.gdn_column_step] (so a replay commit
    reproduces it bit for bit), stores it, and writes ``o[r, i*N + e]``. ``step >= 0``: the new state also goes to
    ``inter[slots[r], step]``; ``stash_step >= 0``: the step's ``g``, ``beta``, ``k``, ``v`` go to the replay stash
    (``[active, V, H]``, ``[active, V, H]``, ``[active, V, G, D]``, ``[active, V, H, N]``).
    """
    r = cuda.blockIdx.x
    column = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = rec.shape[1], rec.shape[2], rec.shape[3]
    if column >= heads * size:
        return
    i, e = column // size, column % size
    j = i // (heads // groups)
    slot = slots[r]
    keys = groups * dim
    value = xbc[r, 2 * keys + column]
    if stash_step >= 0:
        stash_v[slot, stash_step, i, e] = value
        if e == 0:
            stash_g[slot, stash_step, i] = g[r, i]
            stash_beta[slot, stash_step, i] = beta[r, i]
        if column == 0:
            for x in range(keys):
                stash_k[slot, stash_step, x // dim, x % dim] = qk[r, keys + x]
    s = cuda.local.array(MAX_KEY_DIM, float32)
    for d in range(dim):
        s[d] = float32(rec[slot, i, d, e])
    gdn_column_step(s, dim, g[r, i], beta[r, i], value, qk[r], keys + j * dim)
    acc = float32(0.0)
    for d in range(dim):
        rec[slot, i, d, e] = s[d]
        if step >= 0:
            inter[slot, step, i, d, e] = s[d]
        acc += s[d] * qk[r, j * dim + d]
    o[r, column] = acc


class NumbaTinyGatedDeltaNet(NumbaTinyMamba2):
    """The device side of a `TinyGatedDeltaNet`."""

    def _chunk_mixer(self, layer, z, xbc, rec, plan, d_every, scratch):
        """The chunked delta rule over the prompt: ``(o [T, H*N], states after every checkpoint and T)``."""
        config, w = self.model.config, self.weights
        count, chunk = plan.tokens.shape[0], plan.chunk
        heads, dim, size, groups = rec.shape[1], rec.shape[2], rec.shape[3], config.n_groups
        chunks = -(-count // chunk)
        f32 = np.float32
        g, beta = scratch.array("g", count, (heads,), f32), scratch.array("beta", count, (heads,), f32)
        qk = scratch.array("qk", count, (2 * groups * dim,), f32)
        cs = scratch.array("cs", count, (heads,), f32)
        inverse = scratch.array("inverse", chunks, (heads, chunk, chunk), f32)
        wk = scratch.array("wk", count, (heads, dim), f32)
        u = scratch.array("u", count, (heads, size), f32)
        states = scratch.array("states", chunks + 1, (heads, dim, size), f32)
        written = scratch.array("written", count, (heads, size), f32)
        o = scratch.array("o", count, (heads * size,), f32)
        after = scratch.array("after", d_every.shape[0], (heads, dim, size), f32)
        grid, threads = _grid(count, max(heads, 2 * groups))
        gdn_gates[grid, threads](z, xbc, w["dt_bias"][layer], w["a"][layer], groups, dim, g, beta, qk)
        grid, threads = _grid(chunks, heads)
        dt = scratch.array("dt", count, (heads,), f32)  # the gates' softplus (not needed after)
        chunk_cumsum[grid, threads](z, config.conv_dim, w["dt_bias"][layer], w["a"][layer], chunk, dt, cs)
        grid, threads = _grid(chunks * heads, chunk)
        gdn_solve[grid, threads](qk, beta, cs, chunk, groups, inverse)
        grid, threads = _grid(count, heads * (dim + size))
        gdn_wu[grid, threads](inverse, qk, xbc, beta, cs, chunk, groups, wk, u)
        grid, threads = _grid(heads, size)
        gdn_state_passing[grid, threads](rec, plan.slot, wk, u, qk, cs, chunk, groups, 0, states, written)
        grid, threads = _grid(count, heads * size)
        gdn_chunk_out[grid, threads](qk, cs, states, written, chunk, groups, o)
        grid, threads = _grid(d_every.shape[0], heads * size)
        gdn_checkpoints[grid, threads](states, qk, xbc, g, beta, d_every, chunk, groups, after)
        return o, after

    def _decode_layers(
        self, cache, tokens: np.ndarray, slots: np.ndarray, step, positions=None, scratch=None, stash_views=None
    ):
        config, w = self.model.config, self.weights
        n = tokens.shape[0]
        heads, dim, size, groups = (
            config.recurrent_state_num_heads,
            config.recurrent_state_head_dim,
            config.recurrent_state_size,
            config.n_groups,
        )
        width, channels = heads * size, config.conv_dim
        d_tokens, d_slots = cuda.to_device(tokens), cuda.to_device(slots)
        # the shared conv kernel's rounding arguments: round to nearest, no stochastic bits (the
        # GDN model keeps float16 / float32 / float64 states)
        d_positions = cuda.to_device(np.zeros(max(n, 1), dtype=np.int32))
        conv_fmt = cuda.to_device(store_formats(config, config.conv_state_dtype, config.intermediate_conv_state_dtype))
        x = cuda.device_array((n, width), dtype=np.float32)
        normed = cuda.device_array((n, width), dtype=np.float32)
        z = cuda.device_array((n, channels + 2 * heads), dtype=np.float32)
        xbc = cuda.device_array((n, channels), dtype=np.float32)
        g = cuda.device_array((n, heads), dtype=np.float32)
        beta = cuda.device_array((n, heads), dtype=np.float32)
        qk = cuda.device_array((n, 2 * groups * dim), dtype=np.float32)
        o = cuda.device_array((n, width), dtype=np.float32)
        grid, threads = _grid(n, width)
        embed[grid, threads](d_tokens, w["embedding"], x)
        with_step = step is not None
        replay_step = with_step and scratch is not None
        inter_step = with_step and not replay_step
        for layer in range(config.num_recurrent_layers):
            rmsnorm[-(-n // 32), 32](x, normed)
            grid, threads = _grid(n, z.shape[1])
            matvec[grid, threads](normed, w["in_proj"][layer], z, False)
            rec_state, conv_state, stash = self._layer_states(cache, layer, scratch, replay_step, stash_views)
            # arguments a launch does not use (step or stash_step -1) only need the right rank and dtype
            inter_conv = (
                cache.get_intermediate_conv_state(layer) if inter_step else conv_state.reshape((1, *conv_state.shape))
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
                step if inter_step else -1,
                stash["conv"] if replay_step else conv_state,
                step if replay_step else -1,
                d_positions,
                conv_fmt,
                layer,
                0,
                0,
            )
            grid, threads = _grid(n, max(heads, 2 * groups))
            gdn_gates[grid, threads](z, xbc, w["dt_bias"][layer], w["a"][layer], groups, dim, g, beta, qk)
            inter_rec = (
                cache.get_intermediate_recurrent_state(layer)
                if inter_step
                else rec_state.reshape((1, *rec_state.shape))
            )
            if replay_step:
                stash_g, stash_beta, stash_k, stash_v = stash["g"], stash["beta"], stash["k"], stash["v"]
            else:
                flat3 = g.reshape((n, 1, heads))
                flat4 = o.reshape((n, 1, 1, width))
                stash_g, stash_beta, stash_k, stash_v = flat3, flat3, flat4, flat4
            grid, threads = _grid(n, width)
            gdn_state[grid, threads](
                rec_state,
                qk,
                xbc,
                g,
                beta,
                groups,
                d_slots,
                o,
                inter_rec,
                step if inter_step else -1,
                stash_g,
                stash_beta,
                stash_k,
                stash_v,
                step if replay_step else -1,
            )
            matvec[grid, threads](o, w["out_proj"][layer], x, True)
        return x


__all__ = ["NumbaTinyGatedDeltaNet"]
