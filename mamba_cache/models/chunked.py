"""Chunked prefill forms of both mixers in NumPy: Mamba2's SSD scan and Gated DeltaNet's chunked delta rule.

The per-token step (`mamba_cache.replay.reference`) advances a state one token at a time; a prefill
kernel instead cuts the ``T`` prompt tokens into chunks of ``Q`` and, per chunk, computes the
outputs of every token at once (a masked ``Q x Q`` form) and the state at the chunk's end from the
state at its start (state passing). Both functions here return the outputs and the state at every
chunk boundary ``0, Q, 2Q, ..., T``; [`advance`][mamba_cache.models.chunked.advance] gives the state
at a position inside a chunk (the boundary state advanced by the per-token step).

Letters as in `mamba_cache.models.mamba2` / `mamba_cache.models.gdn`: ``T`` tokens, ``Q`` chunk
length, ``H`` heads, ``D`` head dim (GDN: key dim), ``N`` state size (GDN: value dim), ``G``
groups (GDN: key heads; head ``i`` reads group ``i // (H/G)``). Within a chunk, ``cs[t]`` is the
cumulative log decay from the chunk's start through token ``t`` (inclusive), so the decay from
token ``s`` to token ``t >= s`` is ``exp(cs[t] - cs[s])``.

Mamba2 (SSD; Dao and Gu 2024, the ``ssd_minimal`` form), per head, chunk starting at state ``h0``:

    y[t]  = sum_{s <= t} (C[t] . B[s]) * exp(cs[t] - cs[s]) * u[s]     intra-chunk, the masked quadratic form
          + exp(cs[t]) * h0 @ C[t]                                     inter-chunk, from the state passed in
    h_end = exp(cs[-1]) * h0 + sum_s exp(cs[-1] - cs[s]) * u[s] (outer) B[s]

Gated DeltaNet (the chunked delta rule of fla's ``chunk_gated_delta_rule``, WY / UT form), per head,
``S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``. With ``w_t`` the corrected value
each token writes, ``S_t = exp(cs[t]) S0 + sum_{s <= t} exp(cs[t] - cs[s]) k_s w_s^T``, and

    (I + M) W = beta V - diag(beta exp(cs)) K S0,   M[t, s] = beta_t exp(cs[t] - cs[s]) (k_t . k_s) for s < t

so ``W = U - Wk S0`` with ``U = (I + M)^-1 beta V`` and ``Wk = (I + M)^-1 diag(beta exp(cs)) K``
(the UT transform: ``(I + M)`` is unit lower triangular, solved by forward substitution), and

    o[t]  = exp(cs[t]) S0^T q[t] + sum_{s <= t} exp(cs[t] - cs[s]) (q[t] . k[s]) W[s]
    S_end = exp(cs[-1]) S0 + sum_s exp(cs[-1] - cs[s]) k[s] W[s]^T

Everything computes in float32. The chunked algebra sums in another order than the per-token step
(and takes ``exp`` of a sum of log decays instead of a product of decays), so its results equal the
per-token ones only within a tolerance: the docs' "Several checkpoints from one prefill" states it.
"""

from __future__ import annotations

import numpy as np

from ..replay.reference import gdn_step, mamba2_step

__all__ = [
    "CHUNKED_TOLERANCE",
    "advance",
    "boundaries",
    "conv_windows",
    "deviation",
    "gated_delta_chunked",
    "segment_decay",
    "ssd_chunked",
]

F32 = np.float32


def boundaries(tokens: int, chunk: int) -> np.ndarray:
    """Chunk boundaries ``[0, Q, 2Q, ..., T]`` (int64; the last chunk may be shorter than ``Q``)."""
    return np.append(np.arange(0, tokens, chunk), tokens).astype(np.int64)


def segment_decay(log_decay: np.ndarray) -> np.ndarray:
    """``exp`` of the log decay from token ``s`` to token ``t`` of one chunk, 0 above the diagonal.

    Args:
        log_decay: ``[Q, H]`` float32 per-token log decays (``dt * A`` for Mamba2, the log-gate for GDN).

    Returns:
        ``[Q, Q, H]`` float32: ``[t, s, i] = exp(sum_{s < r <= t} log_decay[r, i])`` for ``s <= t``, else 0.
        The sum runs over the segment itself (the stable ``segsum`` of ``ssd_minimal``), not as a
        difference of two long cumulative sums.
    """
    steps = log_decay.shape[0]
    lower = np.tril(np.ones((steps, steps), dtype=bool), k=-1)  # [t, s]: s < t
    terms = np.where(lower[:, :, None], log_decay[:, None, :], F32(0))  # [r, s, H]: log_decay[r] for s < r
    sums = np.cumsum(terms, axis=0, dtype=F32)  # [t, s, H] = sum_{s < r <= t}
    return np.where(np.tril(np.ones((steps, steps), dtype=bool))[:, :, None], np.exp(sums), F32(0)).astype(F32)


def ssd_chunked(
    h0: np.ndarray,
    log_decay: np.ndarray,
    u: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Mamba2's chunked scan (SSD) of one sequence, float32.

    Args:
        h0: ``[H, D, N]`` float32 state before the first token.
        log_decay: ``[T, H]`` float32 ``dt * A`` (the per-token decay is its ``exp``).
        u: ``[T, H, D]`` float32 ``dt * x``.
        b: ``[T, G, N]`` float32 input projections.
        c: ``[T, G, N]`` float32 output projections.
        chunk: ``Q >= 1``.

    Returns:
        ``(y, states)``: ``y`` ``[T, H, D]`` float32, ``sum_n h_t[i, d, n] * C_t[n]`` with ``h_t`` the
        state after token ``t`` (the skip term ``D * x`` is the caller's); ``states``
        ``[len(boundaries) , H, D, N]`` float32, the state at each boundary of
        [`boundaries`][mamba_cache.models.chunked.boundaries] (``states[0]`` is ``h0``).
    """
    heads = h0.shape[0]
    per_group = heads // b.shape[1]
    b_heads = np.repeat(b, per_group, axis=1)  # [T, H, N]
    c_heads = np.repeat(c, per_group, axis=1)
    edges = boundaries(log_decay.shape[0], chunk)
    y = np.zeros(u.shape, dtype=F32)
    states = [h0.astype(F32)]
    h = states[0]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        part = slice(start, stop)
        decay = segment_decay(log_decay[part])  # [Q, Q, H]
        from_start = np.cumsum(log_decay[part], axis=0, dtype=F32)  # [Q, H] decay from the chunk's start
        scores = np.einsum("thn,shn->tsh", c_heads[part], b_heads[part]) * decay  # [Q, Q, H] masked
        y[part] = np.einsum("tsh,shd->thd", scores, u[part])
        y[part] += np.exp(from_start)[:, :, None] * np.einsum("hdn,thn->thd", h, c_heads[part])
        to_end = decay[-1]  # [Q, H]: decay from token s to the chunk's last token
        h = np.exp(from_start[-1])[:, None, None] * h + np.einsum("sh,shd,shn->hdn", to_end, u[part], b_heads[part])
        states.append(h.astype(F32))
    return y.astype(F32), np.stack(states)


def _forward_substitution(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``(I + m) x = rhs`` per head; ``m`` ``[Q, Q, H]`` strictly lower, ``rhs`` ``[Q, H, X]``."""
    x = np.zeros_like(rhs)
    for t in range(rhs.shape[0]):
        x[t] = rhs[t] - np.einsum("sh,shx->hx", m[t, :t], x[:t])
    return x


def gated_delta_chunked(
    s0: np.ndarray,
    log_gate: np.ndarray,
    beta: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q: np.ndarray,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Gated DeltaNet's chunked delta rule (WY / UT form) of one sequence, float32.

    Args:
        s0: ``[H, D, N]`` float32 state before the first token.
        log_gate: ``[T, H]`` float32 log decay (the per-token decay factor ``g`` is its ``exp``).
        beta: ``[T, H]`` float32 write strengths.
        k: ``[T, G, D]`` float32 normalised keys.
        v: ``[T, H, N]`` float32 values.
        q: ``[T, G, D]`` float32 normalised queries.
        chunk: ``Q >= 1``.

    Returns:
        ``(o, states)``: ``o`` ``[T, H, N]`` float32, ``o[t, i, e] = sum_d S_t[i, d, e] q_t[j, d]`` with
        ``S_t`` the state after token ``t``; ``states`` ``[len(boundaries), H, D, N]`` float32 at each
        chunk boundary (``states[0]`` is ``s0``).
    """
    heads = s0.shape[0]
    per_group = heads // k.shape[1]
    k_heads = np.repeat(k, per_group, axis=1)  # [T, H, D]
    q_heads = np.repeat(q, per_group, axis=1)
    edges = boundaries(log_gate.shape[0], chunk)
    o = np.zeros(v.shape, dtype=F32)
    states = [s0.astype(F32)]
    state = states[0]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        part = slice(start, stop)
        kc, qc, bc = k_heads[part], q_heads[part], beta[part]
        decay = segment_decay(log_gate[part])  # [Q, Q, H]
        from_start = np.exp(np.cumsum(log_gate[part], axis=0, dtype=F32))  # [Q, H]
        strict = np.tril(np.ones(decay.shape[:2], dtype=bool), k=-1)[:, :, None]
        m = np.where(strict, bc[:, None, :] * decay * np.einsum("thd,shd->tsh", kc, kc), F32(0)).astype(F32)
        values = _forward_substitution(m, bc[:, :, None] * v[part])  # U [Q, H, N]
        keys = _forward_substitution(m, (bc * from_start)[:, :, None] * kc)  # Wk [Q, H, D]
        written = values - np.einsum("thd,hdn->thn", keys, state)  # W [Q, H, N]
        scores = np.einsum("thd,shd->tsh", qc, kc) * decay  # [Q, Q, H] masked (s <= t)
        o[part] = from_start[:, :, None] * np.einsum("hdn,thd->thn", state, qc)
        o[part] += np.einsum("tsh,shn->thn", scores, written)
        to_end = decay[-1]  # [Q, H]
        state = from_start[-1][:, None, None] * state + np.einsum("sh,shd,shn->hdn", to_end, kc, written)
        states.append(state.astype(F32))
    return o.astype(F32), np.stack(states)


def advance(mixer: str, boundary_states: np.ndarray, edges: np.ndarray, position: int, inputs: dict) -> np.ndarray:
    """The state after ``position`` tokens: the last boundary at or before it, advanced by the per-token step.

    Args:
        mixer: ``"mamba2"`` or ``"gdn"``.
        boundary_states: ``[len(edges), H, D, N]`` float32 from ``ssd_chunked`` / ``gated_delta_chunked``.
        edges: the chunk boundaries (`boundaries`).
        position: tokens consumed, in ``[0, T]``.
        inputs: the per-token step's inputs over all ``T`` tokens: Mamba2 ``dA [T, H]`` (the decay
            factors), ``u [T, H, D]``, ``B [T, G, N]``; GDN ``g [T, H]`` (factors), ``beta``, ``k``, ``v``.

    Returns:
        ``[H, D, N]`` float32. On a boundary, that boundary's state (no arithmetic); inside a chunk, the
        per-token step (`mamba2_step` / `gdn_step`, float32, no rounding between steps) applied from it.
    """
    at = int(np.searchsorted(edges, position, side="right")) - 1
    state = boundary_states[at]
    names, step = (("dA", "u", "B"), mamba2_step) if mixer == "mamba2" else (("g", "beta", "k", "v"), gdn_step)
    for t in range(int(edges[at]), position):
        state = step(state, *(inputs[name][t] for name in names))
    return state.astype(F32)


def conv_windows(window: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Every conv window of a prefill: ``[t]`` is the window after ``t`` more input columns.

    Args:
        window: ``[C, K]`` the slot's window before the first token (any dtype).
        columns: ``[T, C]`` the input columns, already in that dtype (as the window stores them).

    Returns:
        ``[T + 1, C, K]`` windows (copies, no arithmetic): ``[t]`` holds the last ``K`` columns of
        ``window ++ columns[:t]``.
    """
    width = window.shape[1]
    full = np.concatenate([window, columns.T], axis=1)  # [C, K + T]
    take = np.arange(columns.shape[0] + 1)[:, None] + np.arange(width)[None, :]  # [T + 1, K]
    return np.moveaxis(full[:, take], 0, 1)  # [T + 1, C, K]


def deviation(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|`` in float64 (0 when both are all zero): the tolerance table's measure.

    Normalising by the largest magnitude of the reference (one layer's whole state, conv window, or
    output) rather than element by element keeps elements that happen to sit near zero from
    dominating: their absolute error is that of their neighbours, not of their own size.
    """
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    error = float(np.abs(got - want).max()) if want.size else 0.0
    return error / scale if scale else error


#: Largest allowed [`deviation`][mamba_cache.models.chunked.deviation] of a chunked prefill from the
#: per-token decode, by state dtype and kind: "recurrent" / "conv" (a checkpoint's state and window, per
#: layer), "prefill output" (the prefill's outputs of every prompt token) and "decode output" (outputs of
#: the tokens decoded one at a time after restoring a checkpoint). Each is at least 4x the largest
#: value `benchmarks/chunked_tolerance.py` measured (20 seeds of 40 tokens and 10 of 120; chunk sizes
#: 1, 5, 8, 16 and longer than the prompt; every position). float32 and float64 states share a row:
#: both compute in float32. The docs ("Several checkpoints from one prefill") give the measured values
#: and why the bound does not grow with the prompt.
_F32_ROW = {"recurrent": 1e-5, "conv": 2e-6, "prefill output": 4e-6, "decode output": 1e-6}
CHUNKED_TOLERANCE = {
    "float32": _F32_ROW,
    "float64": _F32_ROW,
    "float16": {"recurrent": 1.2e-2, "conv": 4e-3, "prefill output": 2e-3, "decode output": 2e-3},
    "bfloat16": {"recurrent": 8e-2, "conv": 3e-2, "prefill output": 2e-2, "decode output": 2e-2},
}
