"""CUDA kernels of the chunked prefill (`mamba_cache.models.chunked` on device arrays), one sequence.

Simple kernels, written for correctness and to show the structure of a chunked prefill, not tuned:
one thread per output element, sums in a fixed increasing order, float32 throughout. ``T`` prompt
tokens, chunks of ``Q`` (``n_c = ceil(T / Q)`` chunks, the last may be shorter), ``cs[t, i]`` the
cumulative log decay of head ``i`` from its chunk's start through token ``t``. Letters as in
`mamba_cache.models.chunked`; ``n`` checkpoint rows. Grids (``x / threads`` rounded up):

    conv_columns       (T, C)           the input columns as the conv window stores them (pool dtype)
    conv_chunk         (T, C)           xbc[t, c] = silu(window after token t . weight + bias)
    conv_windows_store (n, C)           window after p tokens -> dst[target] (a copy, no arithmetic)
    store_states       (n, X)           float32 state -> dst[target], rounded as the decode step stores it
    chunk_cumsum       (n_c, H)         dt and cs (Mamba2: dt * A; GDN: the log-gate a * softplus(...))

    Mamba2 (SSD: chunk cumsum, chunk state, state passing, chunk scan; then the checkpoints)
    ssd_chunk_state    (n_c, H*D)       the chunk's own end state from zero, per (i, d), over n
    ssd_state_passing  (H*D, N)         h_start[c + 1] = exp(cs[last of c]) * h_start[c] + local[c], sequential in c
    ssd_chunk_scan     (T, H*D)         y = exp(cs[t]) C_t . h_start + sum_{s <= t in chunk} (C_t . B_s) decay(s, t) u_s
    ssd_checkpoints    (n, H*D)         boundary state advanced with the replay's mamba2_update

    Gated DeltaNet (chunked delta rule, WY / UT form)
    gdn_solve          (n_c * H, Q)     column s of (I + M)^-1 by forward substitution
    gdn_wu             (T, H*(D+N))     Wk = (I + M)^-1 diag(beta exp(cs)) K,  U = (I + M)^-1 diag(beta) V
    gdn_state_passing  (H, N)           per state column: W = U - Wk S, then S at the chunk's end; sequential in c
    gdn_chunk_out      (T, H*N)         o = exp(cs[t]) S_start^T q_t + sum_{s <= t} decay(s, t) (q_t . k_s) W_s
    gdn_checkpoints    (n, H*N)         boundary column advanced with the replay's gdn_column_step

A checkpoint at position ``p`` reads the boundary state ``h_start[q]``, ``q = p // Q`` (``n_c`` when
``p = T``), and advances it through tokens ``q*Q .. p-1`` with the per-token step's own device
function, as `mamba_cache.models.chunked.advance` does in NumPy.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from ..precision.kernels import float32_bits, load_float32, stored_value
from ..replay.kernels import MAX_KEY_DIM, gdn_column_step, mamba2_update

__all__ = [
    "conv_chunk",
    "conv_columns",
    "chunk_cumsum",
    "conv_windows_store",
    "gdn_checkpoints",
    "gdn_chunk_out",
    "gdn_solve",
    "gdn_state_passing",
    "gdn_wu",
    "ssd_checkpoints",
    "ssd_chunk_scan",
    "ssd_chunk_state",
    "ssd_state_passing",
    "store_states",
]


@cuda.jit(device=True, inline=True)
def _chunk_of(t, chunk):
    """``(first token, last token)`` of the chunk holding token ``t``."""
    first = (t // chunk) * chunk
    return first, first + chunk - 1


@cuda.jit(device=True, inline=True)
def _boundary(p, tokens, chunk, chunks):
    """``(boundary index q, its token count)`` of the last chunk boundary at or before position ``p``."""
    q = chunks if p == tokens else p // chunk
    return q, min(q * chunk, tokens)


@cuda.jit(device=True, inline=True)
def _softplus(raw):
    return raw if raw > float32(20.0) else float32(math.log1p(math.exp(raw)))


# ---------------------------------------------------------------- conv (both mixers)
@cuda.jit
def conv_columns(z, columns, kernel, start, fmt, layer, seed_lo, seed_hi):
    """``columns[t, c]`` = ``z[t, c]`` as the decode step stores it as the window's newest column.

    ``z`` ``[T, C + ...]`` float32, ``columns`` ``[T, C]`` in the conv pool's dtype (bfloat16: raw
    uint16 bits); rounding as ``fmt`` says, keyed by element ``c*K + K-1`` and position ``start + t + 1``.
    """
    t = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if c >= columns.shape[1]:
        return
    position = np.int64(start) + t + 1
    new = stored_value(z[t, c], fmt[0], fmt[1], fmt[2], c * kernel + kernel - 1, position, layer, 1, seed_lo, seed_hi)
    if fmt[3]:
        columns[t, c] = float32_bits(new) >> np.uint32(16)
    else:
        columns[t, c] = new


@cuda.jit(device=True, inline=True)
def _window_at(conv, slot, columns, c, index):
    """Element ``index`` of ``window ++ columns`` (``window`` = ``conv[slot, c, :]``), raw."""
    kernel = conv.shape[2]
    return conv[slot, c, index] if index < kernel else columns[index - kernel, c]


@cuda.jit
def conv_chunk(conv, columns, weight, bias, slot, xbc, bits16):
    """``xbc[t, c] = silu(sum_k window_t[c, k] * weight[c, k] + bias[c])``, k ascending, as the decode step.

    ``window_t`` is the window after token ``t``: the last ``K`` of ``conv[slot, c, :] ++ columns[:t+1, c]``.
    """
    t = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if c >= conv.shape[1]:
        return
    acc = float32(0.0)
    for k in range(conv.shape[2]):
        acc += load_float32(_window_at(conv, slot, columns, c, t + 1 + k), bits16) * weight[c, k]
    v = acc + bias[c]
    xbc[t, c] = v / (float32(1.0) + math.exp(-v))


@cuda.jit
def conv_windows_store(conv, slot, columns, positions, targets, dst):
    """``dst[targets[r], c, :]`` = the window after ``positions[r]`` prompt tokens (a copy of raw values).

    Writing ``slot`` itself (the final window) is safe: element ``k`` reads index ``p + k >= k + 1``, which
    this thread has not written yet.
    """
    r = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if c >= conv.shape[1]:
        return
    p = positions[r]
    for k in range(conv.shape[2]):
        dst[targets[r], c, k] = _window_at(conv, slot, columns, c, p + k)


@cuda.jit
def store_states(src, targets, positions, start, dst, fmt, layer, seed_lo, seed_hi):
    """``dst[targets[r], x]`` = ``src[r, x]`` (float32 ``[n, X]``) stored as the decode step stores a state.

    ``dst`` ``[rows, X]`` (one layer's pool, flat per row); rounding as ``fmt`` says, keyed by element
    ``x`` and position ``start + positions[r]`` (the tokens the state has consumed), kind 0.
    """
    r = cuda.blockIdx.x
    x = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if x >= src.shape[1]:
        return
    position = np.int64(start) + positions[r]
    value = stored_value(src[r, x], fmt[0], fmt[1], fmt[2], x, position, layer, 0, seed_lo, seed_hi)
    if fmt[3]:
        dst[targets[r], x] = float32_bits(value) >> np.uint32(16)
    else:
        dst[targets[r], x] = value


# ---------------------------------------------------------------- both mixers
@cuda.jit
def chunk_cumsum(z, column, dt_bias, a, chunk, dt, cs):
    """``dt[t, i] = softplus(z[t, column + i] + dt_bias[i])``; ``cs[t, i]`` = running sum of ``dt * a[i]`` in the chunk.

    Both mixers pass ``column = C`` (the first input after the conv channels): Mamba2's ``dt`` input and
    log decay ``dt * A``, Gated DeltaNet's gate input and log-gate ``a * softplus(...)``.
    """
    first = cuda.blockIdx.x * chunk
    i = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if i >= dt.shape[1]:
        return
    acc = float32(0.0)
    for t in range(first, min(first + chunk, dt.shape[0])):
        step = _softplus(z[t, column + i] + dt_bias[i])
        dt[t, i] = step
        acc += step * a[i]
        cs[t, i] = acc


# ---------------------------------------------------------------- Mamba2 (SSD)
@cuda.jit
def ssd_chunk_state(xbc, dt, cs, chunk, groups, local):
    """``local[c, i, d, n] = sum_{s in c} exp(cs[last] - cs[s]) * (dt[s] * x[s, i, d]) * B[s, n]`` (from zero)."""
    ci = cuda.blockIdx.x
    hd = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = local.shape[1], local.shape[2], local.shape[3]
    if hd >= heads * dim:
        return
    i, d = hd // dim, hd % dim
    b_at = heads * dim + (i // (heads // groups)) * size
    first = ci * chunk
    last = min(first + chunk, xbc.shape[0]) - 1
    for n in range(size):
        acc = float32(0.0)
        for s in range(first, last + 1):
            u = dt[s, i] * xbc[s, hd]
            acc += float32(math.exp(cs[last, i] - cs[s, i])) * u * xbc[s, b_at + n]
        local[ci, i, d, n] = acc


@cuda.jit
def ssd_state_passing(rec, slot, local, cs, chunk, bits16, states):
    """``states[0]`` = the slot's state; ``states[c + 1] = exp(cs[last of c]) * states[c] + local[c]``."""
    hd = cuda.blockIdx.x
    n = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    dim, size = rec.shape[2], rec.shape[3]
    if n >= size:
        return
    i, d = hd // dim, hd % dim
    h = load_float32(rec[slot, i, d, n], bits16)
    tokens = cs.shape[0]
    for ci in range(local.shape[0]):
        states[ci, i, d, n] = h
        last = min((ci + 1) * chunk, tokens) - 1
        h = float32(math.exp(cs[last, i])) * h + local[ci, i, d, n]
    states[local.shape[0], i, d, n] = h


@cuda.jit
def ssd_chunk_scan(xbc, dt, cs, states, d_skip, chunk, groups, y):
    """``y[t, i*D + d]``: the state's read-out after token ``t`` plus ``d_skip * x`` (see the module docstring)."""
    t = cuda.blockIdx.x
    hd = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = states.shape[1], states.shape[2], states.shape[3]
    if hd >= heads * dim:
        return
    i, d = hd // dim, hd % dim
    group = i // (heads // groups)
    b_at = heads * dim + group * size
    c_at = heads * dim + groups * size + group * size
    first, _ = _chunk_of(t, chunk)
    ci = t // chunk
    inter = float32(0.0)
    for n in range(size):
        inter += states[ci, i, d, n] * xbc[t, c_at + n]
    acc = float32(math.exp(cs[t, i])) * inter
    for s in range(first, t + 1):
        score = float32(0.0)
        for n in range(size):
            score += xbc[t, c_at + n] * xbc[s, b_at + n]
        acc += score * float32(math.exp(cs[t, i] - cs[s, i])) * (dt[s, i] * xbc[s, hd])
    y[t, hd] = acc + d_skip[i] * xbc[t, hd]


@cuda.jit
def ssd_checkpoints(states, xbc, dt, a, positions, chunk, groups, out):
    """``out[r]`` ``[H, D, N]`` float32: the state after ``positions[r]`` tokens (boundary state + per-token steps)."""
    r = cuda.blockIdx.x
    hd = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = states.shape[1], states.shape[2], states.shape[3]
    if hd >= heads * dim:
        return
    i, d = hd // dim, hd % dim
    b_at = heads * dim + (i // (heads // groups)) * size
    p = positions[r]
    q, first = _boundary(p, xbc.shape[0], chunk, states.shape[0] - 1)
    for n in range(size):
        out[r, i, d, n] = states[q, i, d, n]
    for t in range(first, p):
        decay = float32(math.exp(dt[t, i] * a[i]))  # the decode step's own decay and dt * x
        dtx = float32(dt[t, i] * xbc[t, hd])
        for n in range(size):
            out[r, i, d, n] = mamba2_update(out[r, i, d, n], decay, dtx, xbc[t, b_at + n])


# ---------------------------------------------------------------- Gated DeltaNet (chunked delta rule)
@cuda.jit(device=True, inline=True)
def _dot(qk, t, t_at, s, s_at, dim):
    acc = float32(0.0)
    for d in range(dim):
        acc += qk[t, t_at + d] * qk[s, s_at + d]
    return acc


@cuda.jit
def gdn_solve(qk, beta, cs, chunk, groups, inverse):
    """Column ``s`` of ``(I + M)^-1`` of chunk ``c``, head ``i`` (block ``c * H + i``), by forward substitution.

    ``M[t, r] = beta[t] exp(cs[t] - cs[r]) (k_t . k_r)`` for ``r < t`` (chunk-local indices);
    ``inverse`` ``[n_c, H, Q, Q]`` float32: ``x_t = [t == s] - sum_{s <= r < t} M[t, r] x_r``.
    """
    heads = inverse.shape[1]
    ci, i = cuda.blockIdx.x // heads, cuda.blockIdx.x % heads
    s = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    first = ci * chunk
    length = min(chunk, qk.shape[0] - first)
    if s >= length:
        return
    dim = qk.shape[1] // (2 * groups)
    k_at = groups * dim + (i // (heads // groups)) * dim
    for t in range(length):
        inverse[ci, i, t, s] = float32(1.0) if t == s else float32(0.0)
    for t in range(s + 1, length):
        acc = float32(0.0)
        for r in range(s, t):
            kk = _dot(qk, first + t, k_at, first + r, k_at, dim)
            decay = float32(math.exp(cs[first + t, i] - cs[first + r, i]))
            acc += beta[first + t, i] * decay * kk * inverse[ci, i, r, s]
        inverse[ci, i, t, s] = -acc


@cuda.jit
def gdn_wu(inverse, qk, xbc, beta, cs, chunk, groups, w, u):
    """``w[t, i, d]`` (``Wk``) and ``u[t, i, e]`` (``U``): the chunk's rows of ``(I + M)^-1`` applied, s ascending."""
    t = cuda.blockIdx.x
    col = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = w.shape[1], w.shape[2], u.shape[2]
    if col >= heads * (dim + size):
        return
    i, x = col // (dim + size), col % (dim + size)
    keys = groups * dim
    k_at = keys + (i // (heads // groups)) * dim
    first, _ = _chunk_of(t, chunk)
    ci = t // chunk
    acc = float32(0.0)
    for s in range(first, t + 1):
        weight = inverse[ci, i, t - first, s - first] * beta[s, i]
        if x < dim:
            acc += weight * float32(math.exp(cs[s, i])) * qk[s, k_at + x]
        else:
            acc += weight * xbc[s, 2 * keys + i * size + x - dim]
    if x < dim:
        w[t, i, x] = acc
    else:
        u[t, i, x - dim] = acc


@cuda.jit
def gdn_state_passing(rec, slot, w, u, qk, cs, chunk, groups, bits16, states, written):
    """Per state column ``(i, e)``, chunk after chunk: ``written[t] = U[t] - Wk[t] . S``, then ``S`` at the chunk's end.

    ``states`` ``[n_c + 1, H, D, N]`` float32 (``[0]`` the slot's state), ``written`` ``[T, H, N]`` float32.
    """
    i = cuda.blockIdx.x
    e = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = rec.shape[1], rec.shape[2], rec.shape[3]
    if e >= size:
        return
    k_at = groups * dim + (i // (heads // groups)) * dim
    s = cuda.local.array(MAX_KEY_DIM, float32)
    for d in range(dim):
        s[d] = load_float32(rec[slot, i, d, e], bits16)
    tokens = cs.shape[0]
    chunks = states.shape[0] - 1
    for ci in range(chunks):
        first = ci * chunk
        last = min(first + chunk, tokens) - 1
        for d in range(dim):
            states[ci, i, d, e] = s[d]
        for t in range(first, last + 1):
            acc = float32(0.0)
            for d in range(dim):
                acc += w[t, i, d] * s[d]
            written[t, i, e] = u[t, i, e] - acc
        end = float32(math.exp(cs[last, i]))
        for d in range(dim):
            acc = end * s[d]
            for t in range(first, last + 1):
                acc += float32(math.exp(cs[last, i] - cs[t, i])) * qk[t, k_at + d] * written[t, i, e]
            s[d] = acc
    for d in range(dim):
        states[chunks, i, d, e] = s[d]


@cuda.jit
def gdn_chunk_out(qk, cs, states, written, chunk, groups, o):
    """``o[t, i*N + e]``: the state's read-out by the query after token ``t`` (see the module docstring)."""
    t = cuda.blockIdx.x
    col = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = states.shape[1], states.shape[2], states.shape[3]
    if col >= heads * size:
        return
    i, e = col // size, col % size
    q_at = (i // (heads // groups)) * dim
    k_at = groups * dim + q_at
    first, _ = _chunk_of(t, chunk)
    ci = t // chunk
    acc = float32(0.0)
    for d in range(dim):
        acc += qk[t, q_at + d] * states[ci, i, d, e]
    acc = float32(math.exp(cs[t, i])) * acc
    for s in range(first, t + 1):
        score = _dot(qk, t, q_at, s, k_at, dim)
        acc += float32(math.exp(cs[t, i] - cs[s, i])) * score * written[s, i, e]
    o[t, col] = acc


@cuda.jit
def gdn_checkpoints(states, qk, xbc, g, beta, positions, chunk, groups, out):
    """``out[r]`` ``[H, D, N]`` float32: the state after ``positions[r]`` tokens (boundary column + per-token steps)."""
    r = cuda.blockIdx.x
    col = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    heads, dim, size = states.shape[1], states.shape[2], states.shape[3]
    if col >= heads * size:
        return
    i, e = col // size, col % size
    keys = groups * dim
    k_at = keys + (i // (heads // groups)) * dim
    p = positions[r]
    q, first = _boundary(p, xbc.shape[0], chunk, states.shape[0] - 1)
    s = cuda.local.array(MAX_KEY_DIM, float32)
    for d in range(dim):
        s[d] = states[q, i, d, e]
    for t in range(first, p):
        gdn_column_step(s, dim, g[t, i], beta[t, i], xbc[t, 2 * keys + col], qk[t], k_at)
    for d in range(dim):
        out[r, i, d, e] = s[d]
