"""The first replay kernels, one state element (Mamba2) or one column (Gated DeltaNet) per thread: the tests' oracle.

The backend launches the tiled kernels (``mamba_cache.replay.tiled``); these are the simpler kernels they
replaced, kept here as the reference the tiled ones must equal bit for bit (same device functions from
``mamba_cache.replay.kernels``, same order of operations per element, another spread of the work over
threads). A test builds a manager that launches them with
``NumbaMambaCacheManager(config, replay_kernels=prepare_first)``; ``benchmarks/replay.py`` times them
beside the tiled ones.

```text
rec     [L, B, H*D*N]      state dtype; element (i, d, n) at (i * D + d) * N + n
conv    [L, B, C*K]        conv dtype;  element (c, k) at c * K + k
stash   [L, B*S*elems]     float32 fields, conv column in the conv dtype
grid  = (chunks_rec + chunks_conv, rows, L),  block = (THREADS,)

Mamba2   one thread per state element (i, d, n):  h = fma(u[i, d], B[j, n], h * dA[i])
GDN      one thread per column e of head i, the D values S_i[:, e] in registers (a kernel
         specialised per key dim in SPECIALISED_KEY_DIMS, else a MAX_KEY_DIM local array)
conv     one thread per channel c: window[k] = (window ++ columns)[a + k], k increasing (in place)
```
"""

from __future__ import annotations

from typing import Any

from numba import cuda, float32

from mamba_cache.precision.kernels import load_float32
from mamba_cache.replay.kernels import (
    MAX_KEY_DIM,
    ROUND_NONE,
    ROUND_STORED,
    THREADS,
    _position,
    _replay_conv,
    _rounder,
    _row_slot,
    _step,
    _store_word,
    _track,
    _track_conv,
    bfloat16_in_hardware,
    gdn_accumulate,
    gdn_column_step,
    gdn_write,
    launch_args,
    launch_layout,
    mamba2_update,
)

#: Key dims with a register-resident specialised GDN replay kernel.
SPECIALISED_KEY_DIMS = (32, 64, 128)


def _key_dim_of(key_dim: int) -> Any:
    """A device function giving the key dim: the constant ``key_dim``, or (0) the runtime argument."""
    if key_dim:

        @cuda.jit(device=True, inline=True)
        def fixed(dim):
            return key_dim

        return fixed

    @cuda.jit(device=True, inline=True)
    def runtime(dim):
        return dim

    return runtime


_GDN_KERNELS: dict = {}


def first_gdn_kernel(key_dim: int, rounding: int = ROUND_NONE, bits16: int = 0) -> Any:
    """The Gated DeltaNet replay kernel for key dim ``key_dim`` and a ``rounding`` (cached).

    For ``key_dim`` in `SPECIALISED_KEY_DIMS` the key dim is a compile-time constant: the
    column array has exactly ``D`` entries and every ``d`` loop has a constant trip count, so LLVM
    unrolls them fully and keeps the column in registers (no local memory with ``ROUND_NONE``,
    ``ROUND_HALF`` and ``ROUND_BF16``; ``tests/test_replay.py`` checks the PTX). Stochastic
    rounding (``ROUND_STORED``, a Philox call per element and step) is not unrolled: its column
    lives in local memory. Any other ``D`` (``<= MAX_KEY_DIM``) gets the generic kernel (``key_dim``
    0), whose column lives in a ``MAX_KEY_DIM`` local array: correct, same arithmetic, slower.
    """
    # the bfloat16 rounder depends on bfloat16_in_hardware()
    key = (key_dim if key_dim in SPECIALISED_KEY_DIMS else 0, rounding, int(bits16), bfloat16_in_hardware())
    kernel = _GDN_KERNELS.get(key)
    if kernel is None:
        kernel = _GDN_KERNELS[key] = _make_first_gdn(*key[:3])
    return kernel


_MAMBA2_KERNELS: dict = {}


def first_mamba2_kernel(rounding: int = ROUND_STORED, bits16: int = 0) -> Any:
    """The Mamba2 replay kernel for a ``rounding`` (``ROUND_*``) and pool kind (``bits16``: bfloat16), cached.

    Both are compile-time constants, so the kernel holds only the rounding it uses (a float32 state compiles no
    conversion at all). ``ROUND_STORED`` (the general `round_state`, reading
    the runtime ``mode``) is correct for every pool; the specialised kinds are smaller.
    """
    key = (rounding, int(bits16), bfloat16_in_hardware())
    kernel = _MAMBA2_KERNELS.get(key)
    if kernel is None:
        kernel = _MAMBA2_KERNELS[key] = _make_first_mamba2(*key[:2])
    return kernel


def _make_first_mamba2(rounding: int, pool_bits16: int) -> Any:
    rounder = _rounder(rounding)

    @cuda.jit(cache=False)
    def first_mamba2(
        rec,
        conv,
        dA,  # noqa: N803
        u,
        B,  # noqa: N803
        col,
        chunks_rec,
        heads,
        dim,
        size,
        groups,
        channels,
        width,
        mode,
        exp_bits,
        man_bits,
        bits16,
        half,
        seed_lo,
        seed_hi,
        positions,
        use_positions,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        node_ids,
        use_nodes,
        track_rec,
        track_conv,
        track_entries,
        track_steps,
        use_tracking,
    ):
        """Replay the accepted Mamba2 steps of each row into its slot, every layer, both state kinds.

        Thread ``e`` owns state element ``(i, d, n)``; ``h`` stays in a register for all ``a`` steps and is rounded
        there after every step exactly as the decode step's store rounds it
        (`round_state`; the rounding kind and the pool kind are compile-time
        constants of this kernel, see [`first_mamba2_kernel`][mamba_cache.replay.kernels.first_mamba2_kernel]), then
        stored once.

        Args:
            rec (DeviceNDArray): ``[L, B, H*D*N]`` recurrent pool (read once, written once); a bfloat16
                pool is uint16 raw bits.
            conv (DeviceNDArray): ``[L, B, C*K]`` conv pool (written).
            dA (DeviceNDArray): ``[L, B*S*H]`` float32 stash.
            u (DeviceNDArray): ``[L, B*S*H*D]`` float32 stash.
            B (DeviceNDArray): ``[L, B*S*G*N]`` float32 stash.
            col (DeviceNDArray): ``[L, B*S*C]`` conv input columns, conv dtype.
            chunks_rec (int): x blocks covering one slot's ``H*D*N`` elements.
            heads (int): H.
            dim (int): D.
            size (int): N.
            groups (int): G.
            channels (int): C.
            width (int): K.
            mode (int): the recurrent pool's rounding: 0 exact / hardware, 1 integer nearest even, 2 stochastic.
            exp_bits (int): exponent bits of the recurrent dtype.
            man_bits (int): mantissa bits of the recurrent dtype.
            bits16 (int): 1 for a bfloat16 (uint16 raw bits) recurrent pool.
            half (int): 1 for a float16 pool rounded to nearest (in-register ``cvt.rn.f16.f32``).
            seed_lo (int): low 32 bits of ``Config.rounding_seed``.
            seed_hi (int): high 32 bits of it.
            positions (DeviceNDArray): ``[rows]`` int32 tokens consumed before the verify pass
                (read if ``use_positions``).
            use_positions (int): 1 to read ``positions`` (else 0 is assumed).
            accept_lengths (DeviceNDArray): ``[rows]`` int32; any value is safe.
            state_indices (DeviceNDArray): ``[rows]`` int32 slots, read only if ``use_indices``.
            use_indices (int): 1 to read ``state_indices``.
            seq_len (int): V.
            node_ids (DeviceNDArray): ``[rows, M]`` int32 accepted tree nodes (read only if ``use_nodes``).
            use_nodes (int): 1 for a tree commit: step ``t`` replays stash row ``row * V + node_ids[row, t]``.
            track_rec (DeviceNDArray): ``[L, P, H*D*N]`` prefix-store entries (written if tracking).
            track_conv (DeviceNDArray): ``[L, P, C*K]`` prefix-store entries (written if tracking).
            track_entries (DeviceNDArray): ``[rows]`` int32 store entry of each row (read if ``use_tracking``).
            track_steps (DeviceNDArray): ``[rows]`` int32 step whose state row ``b`` checkpoints, -1 none.
            use_tracking (int): 1 to checkpoint.

        Grid ``(chunks_rec + ceil(C / THREADS), rows, L)``, block ``(THREADS,)``.
        """
        layer, row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], row, node_ids, use_nodes
        )
        if slot < 0:
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, row, accepted, track_rec.shape[1])
        if cuda.blockIdx.x >= chunks_rec:
            c = (cuda.blockIdx.x - chunks_rec) * cuda.blockDim.x + cuda.threadIdx.x
            if c < channels:
                if tracked >= 0:
                    _track_conv(
                        conv, col, track_conv, entry, layer, slot, row, seq_len, tracked, c, channels, width, node_ids,
                        use_nodes,
                    )  # fmt: skip
                _replay_conv(conv, col, layer, slot, row, seq_len, accepted, c, channels, width, node_ids, use_nodes)
            return
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if e >= heads * dim * size:
            return
        i = e // (dim * size)
        d = (e // size) % dim
        n = e % size
        j = i // (heads // groups)
        h = load_float32(rec[layer, slot, e], pool_bits16)
        for t in range(accepted):
            step = _step(node_ids, use_nodes, row, seq_len, t)
            h = mamba2_update(
                h,
                dA[layer, step * heads + i],
                u[layer, (step * heads + i) * dim + d],
                B[layer, (step * groups + j) * size + n],
            )
            position = _position(positions, use_positions, row, t)
            h = rounder(h, mode, exp_bits, man_bits, half, e, position, layer, seed_lo, seed_hi)
            if t == tracked:
                track_rec[layer, entry, e] = _store_word(h, pool_bits16)
        rec[layer, slot, e] = _store_word(h, pool_bits16)

    return first_mamba2


#: The general Mamba2 replay kernel (every rounding, read at run time; a float16 / float32 / float64 pool).
first_mamba2 = first_mamba2_kernel(ROUND_STORED, 0)


def _make_first_gdn(key_dim: int, rounding: int, pool_bits16: int) -> Any:
    column_len = key_dim if key_dim else MAX_KEY_DIM
    key_dim_of = _key_dim_of(key_dim)
    rounds = rounding != ROUND_NONE
    rounder = _rounder(rounding)

    @cuda.jit(cache=False)
    def first_gdn(
        rec,
        conv,
        g,
        beta,
        k,
        v,
        col,
        chunks_rec,
        heads,
        dim,
        size,
        groups,
        channels,
        width,
        mode,
        exp_bits,
        man_bits,
        bits16,
        half,
        seed_lo,
        seed_hi,
        positions,
        use_positions,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        node_ids,
        use_nodes,
        track_rec,
        track_conv,
        track_entries,
        track_steps,
        use_tracking,
    ):
        """Replay the accepted Gated DeltaNet steps of each row into its slot, every layer, both state kinds.

        Thread ``(i, e)`` (``i * N + e`` over the x blocks ``< chunks_rec``) owns column ``e`` of head ``i``'s state
        ``S_i [D, N]``; the order of operations is [`gdn_column_step`][mamba_cache.replay.kernels.gdn_column_step]'s.
        Arguments as `first_mamba2`'s, with the stash fields ``g [L, B*S*H]``, ``beta [L, B*S*H]``, ``k [L, B*S*G*D]``,
        ``v [L, B*S*H*N]`` (float32) and ``chunks_rec`` covering ``H*N`` columns.

        Grid ``(chunks_rec + ceil(C / THREADS), rows, L)``, block ``(THREADS,)``.
        """
        layer, row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], row, node_ids, use_nodes
        )
        if slot < 0:
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, row, accepted, track_rec.shape[1])
        if cuda.blockIdx.x >= chunks_rec:
            c = (cuda.blockIdx.x - chunks_rec) * cuda.blockDim.x + cuda.threadIdx.x
            if c < channels:
                if tracked >= 0:
                    _track_conv(
                        conv, col, track_conv, entry, layer, slot, row, seq_len, tracked, c, channels, width, node_ids,
                        use_nodes,
                    )  # fmt: skip
                _replay_conv(conv, col, layer, slot, row, seq_len, accepted, c, channels, width, node_ids, use_nodes)
            return
        column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if column >= heads * size:
            return
        n_dim = key_dim_of(dim)
        i = column // size
        e = column % size
        j = i // (heads // groups)
        first = i * n_dim * size + e  # element (i, 0, e); (i, d, e) is first + d * size
        s = cuda.local.array(column_len, float32)
        for d in range(n_dim):
            s[d] = load_float32(rec[layer, slot, first + d * size], pool_bits16)
        for t in range(accepted):
            step = _step(node_ids, use_nodes, row, seq_len, t)
            value = v[layer, (step * heads + i) * size + e]
            if rounds:  # a 16-bit pool: each element rounded in registers right after its write, as its store would
                position = _position(positions, use_positions, row, t)
                keys, key_offset, decay = k[layer], (step * groups + j) * n_dim, g[layer, step * heads + i]
                pred = float32(0.0)
                for d in range(n_dim):  # gdn_column_step's operations, in its order
                    s[d] = s[d] * decay
                    pred = gdn_accumulate(pred, s[d], keys[key_offset + d])
                delta = beta[layer, step * heads + i] * (value - pred)
                for d in range(n_dim):
                    s[d] = rounder(
                        gdn_write(s[d], keys[key_offset + d], delta),
                        mode,
                        exp_bits,
                        man_bits,
                        half,
                        first + d * size,
                        position,
                        layer,
                        seed_lo,
                        seed_hi,
                    )
            else:
                gdn_column_step(
                    s,
                    n_dim,
                    g[layer, step * heads + i],
                    beta[layer, step * heads + i],
                    value,
                    k[layer],
                    (step * groups + j) * n_dim,
                )
            if t == tracked:
                for d in range(n_dim):
                    track_rec[layer, entry, first + d * size] = _store_word(s[d], pool_bits16)
        for d in range(n_dim):
            rec[layer, slot, first + d * size] = _store_word(s[d], pool_bits16)

    return first_gdn


def prepare_first(pools: Any, stash: dict, config: Any, placeholder: Any, launch_class: type) -> tuple:
    """(launch, x blocks, layers) of the replay kernel of ``config.mixer`` over a manager's pools.

    The launch starts with no positions, indices, nodes or tracking bound (the ``use_*`` flags 0);
    each call re-points the ones it uses.

    Args:
        pools: the manager's ``StatePools`` (``recurrent`` ``[L, B, H, D, N]``, ``conv`` ``[L, B, C, K]``).
        stash: field name to ``[L, B*S*elems]`` device array.
        config: the manager's config.
        placeholder: an int32 ``[B]`` device array bound to the index arguments until a call re-points them.
        launch_class: ``PreparedLaunch`` (GPU) or ``DispatcherLaunch`` (simulator).
    """
    lay = launch_layout(pools, config)
    heads, dim, size = config.recurrent_state_num_heads, config.recurrent_state_head_dim, config.recurrent_state_size
    if config.mixer == "mamba2":
        kernel, elems = first_mamba2_kernel(lay.rounding, lay.bits16), heads * dim * size
    else:
        kernel, elems = first_gdn_kernel(dim, lay.rounding, lay.bits16), heads * size
    chunks_rec = -(-elems // THREADS)
    chunks_conv = -(-config.conv_dim // THREADS)
    args = launch_args(lay, stash, config, chunks_rec, placeholder)
    return launch_class(kernel, args, THREADS), chunks_rec + chunks_conv, lay.layers
