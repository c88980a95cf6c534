"""CUDA kernels of `mamba_cache.models.mamba2.TinyMamba2`: its decode step on device arrays.

The same function as the NumPy decode step in `mamba_cache.models.mamba2`, reading and
writing the cache manager's tensors in place. One thread per output element; these kernels are
for correctness and for showing the cache in use, not tuned. Grids:

    embed        (R, M)            hidden[r, :] = embedding[tokens[r], :]
    rmsnorm      (R / 32,)         one thread per row
    matvec       (R, O)            out[r, o] (+)= sum_k values[r, k] * w[k, o], k in order
    conv_step    (R, C)            shift slot's conv window, append xbc_raw, xbc = silu(conv)
    ssm_step     (R, H*D)          h = fma(dt*x, b_in, h*decay) over n < N, y = h.c_out + d_skip*x

Letters as in `mamba_cache.models.mamba2` (R rows, one token each; i, d, n index H, D, N).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numba import cuda, float32

from ..core.device import SIMULATOR
from ..precision.kernels import float32_bits, load_float32, store_formats, stored_value
from ..replay.kernels import mamba2_update
from .chunked_kernels import (
    chunk_cumsum,
    conv_chunk,
    conv_columns,
    conv_windows_store,
    ssd_checkpoints,
    ssd_chunk_scan,
    ssd_chunk_state,
    ssd_state_passing,
    store_states,
)
from .chunked_scratch import ChunkedScratch


def _grid(rows: int, cols: int) -> tuple:
    """``((rows, column blocks), threads)``: up to 128 threads, a multiple of 32 covering ``cols``."""
    threads = min(128, -(-cols // 32) * 32)
    return (rows, -(-cols // threads)), threads


@cuda.jit
def embed(tokens, table, hidden):
    """``hidden[i, :] = table[tokens[i], :]``; grid ``(R, ceil(M / threads))``."""
    i = cuda.blockIdx.x
    j = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if j < hidden.shape[1]:
        hidden[i, j] = table[tokens[i], j]


@cuda.jit
def rmsnorm(values, out):
    """``out[i, :] = values[i, :] / sqrt(mean(values[i, :]**2) + 1e-5)``; a thread per row, grid ``(ceil(R / 32),)``."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= values.shape[0]:
        return
    width = values.shape[1]
    acc = float32(0.0)
    for k in range(width):
        acc += values[i, k] * values[i, k]
    scale = float32(1.0) / math.sqrt(acc / float32(width) + float32(1e-5))
    for k in range(width):
        out[i, k] = values[i, k] * scale


@cuda.jit
def matvec(values, weight, out, accumulate):
    """``out[i, o] = (out[i, o] if accumulate else 0) + sum_k values[i, k] * weight[k, o]``, k ascending."""
    i = cuda.blockIdx.x
    o = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if o >= out.shape[1]:
        return
    acc = float32(0.0)
    for k in range(values.shape[1]):
        acc += values[i, k] * weight[k, o]
    if accumulate:
        out[i, o] = out[i, o] + acc
    else:
        out[i, o] = acc


@cuda.jit
def conv_step(
    conv, z, weight, bias, slots, xbc, inter, step, stash_col, stash_step, positions, fmt, layer, seed_lo, seed_hi
):
    """Causal conv1d update of one layer, in place; grid ``(R, ceil(C / threads))``.

    ``conv`` ``[B, C, K]`` (state dtype), ``z`` ``[R, C + H]`` (xbc_raw first), ``weight`` ``[C, K]``,
    ``bias`` ``[C]``, ``slots`` ``[R]``, ``xbc`` ``[R, C]`` float32 out; if ``step >= 0`` the
    new window also goes to ``inter[slots[r], step]`` (``[active, V, C, K]``); if ``stash_step >= 0``
    the input column (the window's last, in the conv dtype) goes to ``stash_col[slots[r], stash_step]``
    (``[active, V, C]``, the replay stash). Stores round as ``fmt`` (``[8]`` int32,
    `mamba_cache.precision.kernels.store_formats`) says, keyed by ``positions[r] + 1`` tokens,
    ``layer`` and the seed halves.
    """
    r = cuda.blockIdx.x  # row
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if c >= conv.shape[1]:
        return
    slot = slots[r]
    kernel = conv.shape[2]
    for k in range(kernel - 1):
        conv[slot, c, k] = conv[slot, c, k + 1]
    position = np.int64(positions[r]) + 1
    new = stored_value(z[r, c], fmt[0], fmt[1], fmt[2], c * kernel + kernel - 1, position, layer, 1, seed_lo, seed_hi)
    if fmt[3]:  # bfloat16: raw bits
        conv[slot, c, kernel - 1] = float32_bits(new) >> np.uint32(16)
    else:
        conv[slot, c, kernel - 1] = new
    acc = float32(0.0)
    for k in range(kernel):
        acc += load_float32(conv[slot, c, k], fmt[3]) * weight[c, k]
    v = acc + bias[c]
    xbc[r, c] = v / (float32(1.0) + math.exp(-v))
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
    if stash_step >= 0:
        stash_col[slot, stash_step, c] = conv[slot, c, kernel - 1]


@cuda.jit
def ssm_step(
    rec,
    xbc,
    z,
    dt_bias,
    a,
    d_skip,
    slots,
    y,
    inter,
    step,
    stash_da,
    stash_u,
    stash_b,
    stash_step,
    positions,
    fmt,
    layer,
    seed_lo,
    seed_hi,
):
    """Selective state update of one layer, in place; grid ``(R, ceil(H*D / threads))``.

    ``rec`` ``[B, H, D, N]`` (state dtype), ``xbc`` ``[R, C]``, ``z`` ``[R, C + H]`` (dt_raw last),
    ``dt_bias``/``a``/``d_skip`` ``[H]`` (``a`` is Mamba's A, < 0; ``d_skip`` its D), ``y`` ``[R, H*D]``
    float32 out; if ``step >= 0`` the new state also goes to ``inter[slots[r], step]``; if
    ``stash_step >= 0`` the step's inputs go to the replay stash ``stash_da [active, V, H]``,
    ``stash_u [active, V, H, D]``, ``stash_b [active, V, G, N]`` at ``[slots[r], stash_step]``. Stores
    round as in `conv_step`. ``G`` B/C groups (``C = H*D + 2*G*N``): head ``i`` reads group
    ``i // (H/G)``, whose ``b_in`` is ``xbc[r, H*D + g*N :]`` and ``c_out`` ``xbc[r, H*D + G*N + g*N :]``.

    The state update is the replay kernel's own device function,
    ``h = mamba2_update(h, decay, dt * x, b_in) = fma(dt * x, b_in, h * decay)``, so a replay commit
    reproduces this step bit for bit on the GPU.
    """
    r = cuda.blockIdx.x  # row
    hd = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = rec.shape[1], rec.shape[2], rec.shape[3]
    if hd >= heads * dim:
        return
    i, d = hd // dim, hd % dim  # head, head-dim index
    slot = slots[r]
    channels = xbc.shape[1]
    raw = z[r, channels + i] + dt_bias[i]
    dt = raw if raw > float32(20.0) else float32(math.log1p(math.exp(raw)))
    decay = float32(math.exp(dt * a[i]))
    x = xbc[r, hd]
    dtx = float32(dt * x)
    width = heads * dim
    groups = (channels - width) // (2 * size)
    per_group = heads // groups
    group = i // per_group
    b_at = width + group * size  # this head's group's b_in, then c_out
    c_at = width + groups * size + group * size
    if stash_step >= 0:
        if d == 0:
            stash_da[slot, stash_step, i] = decay
        stash_u[slot, stash_step, i, d] = dtx
        if d == 0 and i % per_group == 0:  # the group's first head writes its B
            for n in range(size):
                stash_b[slot, stash_step, group, n] = xbc[r, b_at + n]
    acc = float32(0.0)
    position = np.int64(positions[r]) + 1
    for n in range(size):
        new = mamba2_update(load_float32(rec[slot, i, d, n], fmt[3]), decay, dtx, xbc[r, b_at + n])
        element = hd * size + n
        kept = stored_value(new, fmt[0], fmt[1], fmt[2], element, position, layer, 0, seed_lo, seed_hi)
        if fmt[3]:
            rec[slot, i, d, n] = float32_bits(kept) >> np.uint32(16)
        else:
            rec[slot, i, d, n] = kept
        if step >= 0:
            kept = stored_value(new, fmt[4], fmt[5], fmt[6], element, position, layer, 0, seed_lo, seed_hi)
            if fmt[7]:
                inter[slot, step, i, d, n] = float32_bits(kept) >> np.uint32(16)
            else:
                inter[slot, step, i, d, n] = kept
        acc += new * xbc[r, c_at + n]
    y[r, hd] = acc + d_skip[i] * x


class NumbaTinyMamba2:
    """The device side of a `TinyMamba2`: weights and decode step."""

    def __init__(self, model) -> None:
        self.model = model
        self.weights = {name: cuda.to_device(np.ascontiguousarray(value)) for name, value in model.weights.items()}
        self._scratch: dict = {}  # the chunked prefill's, per (device, chunk size)

    def _decode(self, cache, tokens: np.ndarray, slots: np.ndarray, step, positions=None, scratch=None, stash=None):
        # A tiny model launches tiny grids on purpose: Numba's low-occupancy warning says nothing here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Grid size .* will likely result in GPU under-utilization")
            return self._decode_layers(cache, tokens, slots, step, positions, scratch, stash)

    def _checkpoint_window(self, cache, draft_tokens: np.ndarray, slots: np.ndarray, ring_steps, p0) -> np.ndarray:
        """The checkpoint-mode verify window on the device (``TinyMamba2._checkpoint_window``): outputs ``[n, V, M]``.

        Step ``t`` reads each row's state after ``h + t`` ring steps with
        [`states_after`][mamba_cache.checkpoint.reading.states_after] (the reading device functions), decodes
        it as the replay-mode verify pass does (its stash fields into a one-step stash), and copies those
        into the ring at ``[slot, h + t]``.
        """
        from ..checkpoint.reading import states_after

        config = self.model.config
        rows, verify_len = draft_tokens.shape
        layers = range(config.num_recurrent_layers)
        d_slots, d_p0 = cuda.to_device(slots.astype(np.int32)), cuda.to_device(p0.astype(np.int64))
        outputs = []
        for t in range(verify_len):
            d_steps = cuda.to_device((ring_steps + t).astype(np.int32))
            scratch, stash = [], []
            for layer in layers:
                history = cache.get_history(layer)
                scratch.append(
                    states_after(
                        config,
                        cache.get_recurrent_state(layer),
                        cache.get_conv_state(layer),
                        history,
                        d_slots,
                        d_steps,
                        d_p0,
                        layer,
                    )  # fmt: skip
                )
                stash.append({name: cuda.device_array((rows, 1, *v.shape[2:]), v.dtype) for name, v in history.items()})
            tokens = np.ascontiguousarray(draft_tokens[:, t])
            hidden = self._decode(cache, tokens, np.arange(rows), 0, p0 + ring_steps + t, scratch, stash)
            for layer in layers:
                for name, view in cache.get_history(layer).items():
                    for row, slot in enumerate(slots):
                        view[slot, ring_steps[row] + t].copy_to_device(stash[layer][name][row, 0])
            outputs.append(hidden.copy_to_host())
        return np.stack(outputs, axis=1)

    def _verify_replay(self, cache, draft_tokens: np.ndarray, start=None) -> None:
        """Replay-mode verify: advance device copies of the rows' states, write the stash (see TinyMamba2.verify)."""
        active = draft_tokens.shape[0]
        start = np.zeros(active, np.int64) if start is None else start  # tokens consumed before the drafts
        scratch = []
        for layer in range(self.model.config.num_recurrent_layers):
            copies = []
            for state in (cache.get_recurrent_state(layer), cache.get_conv_state(layer)):
                copy = cuda.device_array((active, *state.shape[1:]), dtype=state.dtype)
                copy.copy_to_device(state[:active])
                copies.append(copy)
            scratch.append(tuple(copies))
        for t in range(draft_tokens.shape[1]):
            self._decode(cache, np.ascontiguousarray(draft_tokens[:, t]), np.arange(active), t, start + t, scratch)

    def _prefill_chunked(self, cache, plan):
        """The chunked prefill on device arrays (see ``TinyMamba2.prefill_chunked``); returns ``[T, M]`` outputs.

        Its working arrays and inputs live in a [`ChunkedScratch`][mamba_cache.models.chunked_scratch.ChunkedScratch]
        per device and chunk size: a call after the first of its size allocates nothing and copies only
        the inputs that changed (asynchronously, on the manager's ``default_stream``, which the kernels
        run on). The returned outputs are that scratch's buffer: read them before the next chunked
        prefill of this model with the same chunk size on the device.
        """
        key = (cache.device_id, plan.chunk)
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch[key] = ChunkedScratch(cache.default_stream)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Grid size .* will likely result in GPU under-utilization")
            return self._prefill_layers(cache, plan, scratch)

    def _prefill_layers(self, cache, plan, scratch):
        config, w = self.model.config, self.weights
        count, channels = plan.tokens.shape[0], config.conv_dim
        width = self.weights["out_proj"].shape[1]
        seed_lo, seed_hi = config.rounding_seed & 0xFFFFFFFF, config.rounding_seed >> 32
        conv_host = store_formats(config, config.conv_state_dtype, config.intermediate_conv_state_dtype)
        conv_fmt = scratch.input("conv_fmt", conv_host)
        rec_fmt = scratch.input(
            "rec_fmt", store_formats(config, config.recurrent_state_dtype, config.intermediate_recurrent_state_dtype)
        )
        n = plan.positions.shape[0]
        every = np.append(plan.positions, count).astype(np.int32)  # the checkpoints, then the final state
        d_every = scratch.input("every", every)
        d_targets = scratch.input("targets", np.append(plan.targets, plan.slot).astype(np.int32))
        hidden = scratch.array("hidden", count, (width,), np.float32)
        normed = scratch.array("normed", count, (width,), np.float32)
        z = scratch.array("z", count, (w["in_proj"].shape[2],), np.float32)
        xbc = scratch.array("xbc", count, (channels,), np.float32)
        grid, threads = _grid(count, width)
        embed[grid, threads](scratch.input("tokens", plan.tokens), w["embedding"], hidden)
        for layer in range(config.num_recurrent_layers):
            rmsnorm[-(-count // 32), 32](hidden, normed)
            grid, threads = _grid(count, z.shape[1])
            matvec[grid, threads](normed, w["in_proj"][layer], z, False)
            rec, conv = cache.get_recurrent_state(layer), cache.get_conv_state(layer)
            columns = scratch.array("columns", count, (channels,), conv.dtype)
            grid, threads = _grid(count, channels)
            conv_columns[grid, threads](z, columns, config.conv_kernel, plan.start, conv_fmt, layer, seed_lo, seed_hi)
            conv_chunk[grid, threads](
                conv, columns, w["conv_weight"][layer], w["conv_bias"][layer], plan.slot, xbc, int(conv_host[3])
            )
            out, after = self._chunk_mixer(layer, z, xbc, rec, plan, d_every, scratch)  # [T, width], [n + 1, H, D, N]
            grid, threads = _grid(count, width)
            matvec[grid, threads](out, w["out_proj"][layer], hidden, True)
            pools = (rec, conv) if plan.store is None else tuple(pool[layer] for pool in plan.entry_pools)
            flat = after.reshape((n + 1, config.recurrent_slot_elems))
            # the checkpoints first: the final write into the slot comes after every read of its window
            for rows, dst_rec, dst_conv in ((slice(0, n), *pools), (slice(n, n + 1), rec, conv)):
                if rows.stop == rows.start:
                    continue
                grid, threads = _grid(rows.stop - rows.start, flat.shape[1])
                store_states[grid, threads](
                    flat[rows],
                    d_targets[rows],
                    d_every[rows],
                    plan.start,
                    dst_rec.reshape((dst_rec.shape[0], config.recurrent_slot_elems)),
                    rec_fmt,
                    layer,
                    seed_lo,
                    seed_hi,
                )
                grid, threads = _grid(rows.stop - rows.start, channels)
                conv_windows_store[grid, threads](conv, plan.slot, columns, d_every[rows], d_targets[rows], dst_conv)
        return hidden

    def _chunk_mixer(self, layer, z, xbc, rec, plan, d_every, scratch):
        """Mamba2's SSD over the prompt: ``(y [T, H*D], states after every checkpoint and T [n + 1, H, D, N])``."""
        config, w = self.model.config, self.weights
        count, chunk = plan.tokens.shape[0], plan.chunk
        heads, dim, size = rec.shape[1], rec.shape[2], rec.shape[3]
        chunks = -(-count // chunk)
        f32 = np.float32
        dt, cs = scratch.array("dt", count, (heads,), f32), scratch.array("cs", count, (heads,), f32)
        local = scratch.array("local", chunks, (heads, dim, size), f32)
        states = scratch.array("states", chunks + 1, (heads, dim, size), f32)
        y = scratch.array("y", count, (heads * dim,), f32)
        after = scratch.array("after", d_every.shape[0], (heads, dim, size), f32)
        bits16 = int(config.recurrent_state_dtype.name == "bfloat16")
        grid, threads = _grid(chunks, heads)
        chunk_cumsum[grid, threads](z, config.conv_dim, w["dt_bias"][layer], w["a"][layer], chunk, dt, cs)
        grid, threads = _grid(chunks, heads * dim)
        ssd_chunk_state[grid, threads](xbc, dt, cs, chunk, config.n_groups, local)
        grid, threads = _grid(heads * dim, size)
        ssd_state_passing[grid, threads](rec, plan.slot, local, cs, chunk, bits16, states)
        grid, threads = _grid(count, heads * dim)
        ssd_chunk_scan[grid, threads](xbc, dt, cs, states, w["d_skip"][layer], chunk, config.n_groups, y)
        grid, threads = _grid(d_every.shape[0], heads * dim)
        ssd_checkpoints[grid, threads](states, xbc, dt, w["a"][layer], d_every, chunk, config.n_groups, after)
        return y, after

    @staticmethod
    def _layer_states(cache, layer: int, scratch, replay_step: bool, stash_views) -> tuple:
        """``(recurrent, conv, stash)`` of a layer's step: the pools or the scratch copies, and the stash to write.

        The stash (``None`` unless ``replay_step``) is ``stash_views[layer]`` when given (the checkpoint-mode
        window's one-step stash), else the cache's replay stash.
        """
        rec_state, conv_state = (
            (cache.get_recurrent_state(layer), cache.get_conv_state(layer)) if scratch is None else scratch[layer]
        )
        if not replay_step:
            return rec_state, conv_state, None
        return rec_state, conv_state, cache.get_replay_stash(layer) if stash_views is None else stash_views[layer]

    def _decode_layers(
        self, cache, tokens: np.ndarray, slots: np.ndarray, step, positions=None, scratch=None, stash_views=None
    ):
        config, w = self.model.config, self.weights
        n = tokens.shape[0]  # R
        width = config.recurrent_state_num_heads * config.recurrent_state_head_dim
        channels = config.conv_dim
        d_tokens, d_slots = cuda.to_device(tokens), cuda.to_device(slots)
        if positions is None:
            positions = np.zeros(n, np.int64)
        d_positions = cuda.to_device(np.ascontiguousarray(positions, dtype=np.int32))
        seed = config.rounding_seed
        seed_lo, seed_hi = seed & 0xFFFFFFFF, seed >> 32
        conv_fmt = cuda.to_device(store_formats(config, config.conv_state_dtype, config.intermediate_conv_state_dtype))
        rec_fmt = cuda.to_device(
            store_formats(config, config.recurrent_state_dtype, config.intermediate_recurrent_state_dtype)
        )
        hidden = cuda.device_array((n, width), dtype=np.float32)
        normed = cuda.device_array((n, width), dtype=np.float32)
        z = cuda.device_array((n, channels + config.recurrent_state_num_heads), dtype=np.float32)
        xbc = cuda.device_array((n, channels), dtype=np.float32)
        y = cuda.device_array((n, width), dtype=np.float32)
        grid, threads = _grid(n, width)
        embed[grid, threads](d_tokens, w["embedding"], hidden)
        with_step = step is not None
        for layer in range(config.num_recurrent_layers):
            rmsnorm[-(-n // 32), 32](hidden, normed)
            grid, threads = _grid(n, z.shape[1])
            matvec[grid, threads](normed, w["in_proj"][layer], z, False)
            # without a step the kernels never touch `inter`; any array of the right rank will do
            replay_step = with_step and scratch is not None
            rec_state, conv_state, stash = self._layer_states(cache, layer, scratch, replay_step, stash_views)
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
                d_positions,
                conv_fmt,
                layer,
                seed_lo,
                seed_hi,
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
                w["a"][layer],
                w["d_skip"][layer],
                d_slots,
                y,
                inter_rec,
                step if inter_step else -1,
                stash_da,
                stash_u,
                stash_b,
                step if replay_step else -1,
                d_positions,
                rec_fmt,
                layer,
                seed_lo,
                seed_hi,
            )
            matvec[grid, threads](y, w["out_proj"][layer], hidden, True)
        return hidden


__all__ = ["NumbaTinyMamba2", "SIMULATOR"]
