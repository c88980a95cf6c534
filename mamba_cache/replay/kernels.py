"""CUDA kernels of the replay commit, and the device step functions the tiny models share.

One launch covers every layer, every committing row and both state kinds of one mixer. The pools
are seen flat per slot; the stash fields flat per layer (the verify pass wrote ``[active, V, ...]``
from the start of each layer, so row ``b``, step ``t`` is stash row ``b * V + t``)::

    rec     [L, B, H*D*N]      state dtype; element (i, d, n) at (i * D + d) * N + n
    conv    [L, B, C*K]        conv dtype;  element (c, k) at c * K + k
    stash   [L, B*S*elems]     float32 fields, conv column in the conv dtype

    grid  = (chunks_rec + chunks_conv, rows, L),  block = (THREADS,)
    blockIdx.z -> layer, blockIdx.y -> row b, blockIdx.x < chunks_rec -> a tile of the state,
    else a tile of the conv channels.

Each thread owns its part of one row's state for the whole replay: it reads it once, applies the
``a`` accepted steps in registers, and writes it once (16-bit states are also stored and re-read
after every step, which rounds them exactly as the decode step's store does; that traffic stays
in L1/L2). The stash reads are small and shared by many threads of the block (L1 hits).

    Mamba2   one thread per state element (i, d, n):  h = fma(u[i, d], B[j, n], h * dA[i])
    GDN      one thread per column e of head i: the D values S_i[:, e] live in a local array; per step
                 S_i[d, e] = S_i[d, e] * g[i]                         (d = 0 .. D-1)
                 pred = fma(S_i[d, e], k[j, d], pred)                 (d increasing, from 0)
                 delta = beta[i] * (v[i, e] - pred)
                 S_i[d, e] = fma(k[j, d], delta, S_i[d, e])
             so the reduction over d needs no cross-thread sum and has one fixed order. Consecutive
             threads own consecutive columns e, so every load and store of S is coalesced.
    conv     one thread per channel c: window[k] = (window ++ columns)[a + k], k increasing (in place).

A tree commit (``use_nodes``) replays stash rows ``b * V + node_ids[b, t]`` for
``t < min(a, M)`` instead of ``b * V + t``: the same kernels, one indirection.

The ``@cuda.jit(device=True)`` step functions below are what the tiny models' Numba decode
kernels call, so replay equals the sequential decode step bit for bit on the GPU. Where the
tracking of the prefix store lands, "copy the state after step t to entry e" is one more store
inside the step loop of each kernel (the state after step ``t`` is in registers there).
"""

from __future__ import annotations

from typing import Any

from numba import cuda, float32

#: Threads per block.
THREADS = 128
#: Largest Gated DeltaNet key dim D (the per-thread column lives in a local array of this size).
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

    ``keys[key_offset + d]`` is ``k[j, d]``; ``value`` is ``v[i, e]``. Order of operations::

        for d = 0 .. dim-1:  s[d] = s[d] * decay;  pred = fma(s[d], k[d], pred)     (pred starts at 0)
        delta = beta * (value - pred)
        for d = 0 .. dim-1:  s[d] = fma(k[d], delta, s[d])

    The tiny GDN model's decode kernel and :func:`replay_gdn` both call this, so they agree bit for bit.
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

    A tree row (``use_nodes``) replays ``min(a, M)`` steps, the nodes ``node_ids[row, :min(a, M)]``,
    and is skipped unless every one of them is in ``[0, V)``.
    """
    accepted = accept_lengths[row]
    if use_nodes:
        if accepted > node_ids.shape[1]:
            accepted = node_ids.shape[1]
        if accepted < 1:
            return 0, -1
        for t in range(accepted):
            node = node_ids[row, t]
            if node < 0 or node >= seq_len:
                return 0, -1
    elif accepted < 1 or accepted > seq_len:
        return 0, -1
    slot = state_indices[row] if use_indices else row
    if slot < 0 or slot >= slots:
        return 0, -1
    return accepted, slot


@cuda.jit(cache=False)
def replay_mamba2(
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
    round_each_step,
    accept_lengths,
    state_indices,
    use_indices,
    seq_len,
    node_ids,
    use_nodes,
):
    """Replay the accepted Mamba2 steps of each row into its slot, every layer, both state kinds.

    Args:
        rec (DeviceNDArray): ``[L, B, H*D*N]`` recurrent pool (read once, written).
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
        round_each_step (int): 1 when the state dtype is narrower than float32 (store and re-read
            after every step, rounding as the decode step does), else 0.
        accept_lengths (DeviceNDArray): ``[rows]`` int32; any value is safe.
        state_indices (DeviceNDArray): ``[rows]`` int32 slots, read only if ``use_indices``.
        use_indices (int): 1 to read ``state_indices``.
        seq_len (int): V.
        node_ids (DeviceNDArray): ``[rows, M]`` int32 accepted tree nodes (read only if ``use_nodes``).
        use_nodes (int): 1 for a tree commit: step ``t`` replays stash row ``row * V + node_ids[row, t]``.

    Grid ``(chunks_rec + ceil(C / THREADS), rows, L)``, block ``(THREADS,)``.
    """
    layer, row = cuda.blockIdx.z, cuda.blockIdx.y
    accepted, slot = _row_slot(
        accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], row, node_ids, use_nodes
    )
    if slot < 0:
        return
    if cuda.blockIdx.x >= chunks_rec:
        c = (cuda.blockIdx.x - chunks_rec) * cuda.blockDim.x + cuda.threadIdx.x
        if c < channels:
            _replay_conv(conv, col, layer, slot, row, seq_len, accepted, c, channels, width, node_ids, use_nodes)
        return
    e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if e >= heads * dim * size:
        return
    i = e // (dim * size)
    d = (e // size) % dim
    n = e % size
    j = i // (heads // groups)
    h = float32(rec[layer, slot, e])
    for t in range(accepted):
        step = _step(node_ids, use_nodes, row, seq_len, t)
        h = mamba2_update(
            h,
            dA[layer, step * heads + i],
            u[layer, (step * heads + i) * dim + d],
            B[layer, (step * groups + j) * size + n],
        )
        if round_each_step:
            rec[layer, slot, e] = h
            h = float32(rec[layer, slot, e])
    rec[layer, slot, e] = h


@cuda.jit(cache=False)
def replay_gdn(
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
    round_each_step,
    accept_lengths,
    state_indices,
    use_indices,
    seq_len,
    node_ids,
    use_nodes,
):
    """Replay the accepted Gated DeltaNet steps of each row into its slot, every layer, both state kinds.

    Thread ``(i, e)`` (``i * N + e`` over the x blocks ``< chunks_rec``) owns column ``e`` of head
    ``i``'s state ``S_i [D, N]`` (D <= MAX_KEY_DIM): the order of operations is in the module docstring.

    Args:
        rec (DeviceNDArray): ``[L, B, H*D*N]`` recurrent pool, element (i, d, e) at ``(i * D + d) * N + e``.
        conv (DeviceNDArray): ``[L, B, C*K]`` conv pool.
        g (DeviceNDArray): ``[L, B*S*H]`` float32 stash, the decay factors.
        beta (DeviceNDArray): ``[L, B*S*H]`` float32 stash.
        k (DeviceNDArray): ``[L, B*S*G*D]`` float32 stash (normalised keys).
        v (DeviceNDArray): ``[L, B*S*H*N]`` float32 stash.
        col (DeviceNDArray): ``[L, B*S*C]`` conv input columns, conv dtype.
        chunks_rec (int): x blocks covering one slot's ``H*N`` columns.
        heads (int): H (value heads).
        dim (int): D (key dim, <= MAX_KEY_DIM).
        size (int): N (value dim).
        groups (int): G (key heads).
        channels (int): C.
        width (int): K.
        round_each_step (int): as in :func:`replay_mamba2`.
        accept_lengths (DeviceNDArray): ``[rows]`` int32; any value is safe.
        state_indices (DeviceNDArray): ``[rows]`` int32 slots, read only if ``use_indices``.
        use_indices (int): 1 to read ``state_indices``.
        seq_len (int): V.
        node_ids (DeviceNDArray): ``[rows, M]`` int32 accepted tree nodes (read only if ``use_nodes``).
        use_nodes (int): 1 for a tree commit: step ``t`` replays stash row ``row * V + node_ids[row, t]``.

    Grid ``(chunks_rec + ceil(C / THREADS), rows, L)``, block ``(THREADS,)``.
    """
    layer, row = cuda.blockIdx.z, cuda.blockIdx.y
    accepted, slot = _row_slot(
        accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], row, node_ids, use_nodes
    )
    if slot < 0:
        return
    if cuda.blockIdx.x >= chunks_rec:
        c = (cuda.blockIdx.x - chunks_rec) * cuda.blockDim.x + cuda.threadIdx.x
        if c < channels:
            _replay_conv(conv, col, layer, slot, row, seq_len, accepted, c, channels, width, node_ids, use_nodes)
        return
    column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if column >= heads * size:
        return
    i = column // size
    e = column % size
    j = i // (heads // groups)
    first = i * dim * size + e  # element (i, 0, e); (i, d, e) is first + d * size
    s = cuda.local.array(MAX_KEY_DIM, float32)
    for d in range(dim):
        s[d] = float32(rec[layer, slot, first + d * size])
    for t in range(accepted):
        step = _step(node_ids, use_nodes, row, seq_len, t)
        value = v[layer, (step * heads + i) * size + e]
        gdn_column_step(
            s,
            dim,
            g[layer, step * heads + i],
            beta[layer, step * heads + i],
            value,
            k[layer],
            (step * groups + j) * dim,
        )
        if round_each_step:
            for d in range(dim):
                rec[layer, slot, first + d * size] = s[d]
                s[d] = float32(rec[layer, slot, first + d * size])
    for d in range(dim):
        rec[layer, slot, first + d * size] = s[d]


def prepare(pools: Any, stash: dict, config: Any, placeholder: Any, launch_class: type) -> tuple:
    """(launch, x blocks, layers) of the replay kernel of ``config.mixer`` over a manager's pools.

    Args:
        pools: the manager's ``StatePools`` (``recurrent`` ``[L, B, H, D, N]``, ``conv`` ``[L, B, C, K]``).
        stash: field name to ``[L, B*S*elems]`` device array.
        config: the manager's config.
        placeholder: an int32 ``[B]`` device array bound to the index arguments until a call re-points them.
        launch_class: ``PreparedLaunch`` (GPU) or ``DispatcherLaunch`` (simulator).
    """
    layers, slots = config.num_recurrent_layers, config.max_batch_size
    heads, dim, size, groups = (
        config.recurrent_state_num_heads,
        config.recurrent_state_head_dim,
        config.recurrent_state_size,
        config.n_groups,
    )
    rec = pools.recurrent.reshape(layers, slots, heads * dim * size)
    conv = pools.conv.reshape(layers, slots, config.conv_dim * config.conv_kernel)
    if config.mixer == "mamba2":
        kernel, fields, elems = replay_mamba2, ("dA", "u", "B"), heads * dim * size
    else:
        kernel, fields, elems = replay_gdn, ("g", "beta", "k", "v"), heads * size
    chunks_rec = -(-elems // THREADS)
    chunks_conv = -(-config.conv_dim // THREADS)
    round_each_step = int(config.recurrent_state_dtype.itemsize < 4)
    args = (
        rec,
        conv,
        *(stash[name] for name in fields),
        stash["conv"],
        chunks_rec,
        heads,
        dim,
        size,
        groups,
        config.conv_dim,
        config.conv_kernel,
        round_each_step,
        placeholder,
        placeholder,
        0,
        1,
        placeholder.reshape((placeholder.size, 1)),
        0,
    )
    return launch_class(kernel, args, THREADS), chunks_rec + chunks_conv, layers
