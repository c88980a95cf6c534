"""The replay commit in NumPy: the step functions of both mixers and the commit over the pools.

Letters: ``L`` layers, ``B`` slots, ``S`` max verify length, ``V`` current verify length, ``H`` heads,
``D`` head dim (Gated DeltaNet: key dim), ``N`` state size (Gated DeltaNet: value dim), ``G``
groups (Gated DeltaNet: key heads), ``C, K`` conv channels and width, ``R`` committing rows.

Every step computes in float32, in this order of operations (each ``*``/``+`` rounds to float32;
NumPy never fuses a multiply-add):

    Mamba2     h' = (h * dA[i]) + (u[i, d] * B[i // (H/G), n])
    GDN        S1 = S * g[i]
               pred[e] = (((0 + S1[0, e] * k[j, 0]) + S1[1, e] * k[j, 1]) + ...)   d increasing, j = i // (H/G)
               delta[e] = beta[i] * (v[i, e] - pred[e])
               S'[d, e] = S1[d, e] + k[j, d] * delta[e]

The tiny models' NumPy decode steps call these same functions, which is what makes replay equal to sequential decoding
bit for bit on the NumPy backend. The Numba kernels use ``cuda.fma`` for the multiply-adds (see
[`mamba_cache.replay.kernels`][mamba_cache.replay.kernels]), so NumPy and Numba agree within a tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..precision.quant8 import SLOT_SCALE_POOLS
from ..precision.reference import rounds_stochastically

F32 = np.float32

__all__ = ["conv_after", "gdn_step", "mamba2_step", "replay_commit"]


def mamba2_step(h: np.ndarray, dA: np.ndarray, u: np.ndarray, B: np.ndarray) -> np.ndarray:  # noqa: N803
    """One Mamba2 state update, ``h * dA + u (outer) B``, float32.

    Args:
        h: ``[..., H, D, N]`` float32 state.
        dA: ``[..., H]`` float32 decay ``exp(dt * A)``.
        u: ``[..., H, D]`` float32 ``dt * x``.
        B: ``[..., G, N]`` float32 input projection, shared by ``H / G`` heads per group.

    Returns:
        ``[..., H, D, N]`` float32: ``(h * dA) + (u * B)``, two rounded products then a rounded sum.
    """
    per_group = h.shape[-3] // B.shape[-2]
    b_heads = np.repeat(B, per_group, axis=-2)  # [..., H, N]
    return h * dA[..., None, None] + u[..., None] * b_heads[..., :, None, :]


def gdn_step(S: np.ndarray, g: np.ndarray, beta: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:  # noqa: N803
    """One Gated DeltaNet (delta rule) state update, float32; order of operations in the module docstring.

    Args:
        S: ``[..., H, D, N]`` float32 state (value heads, key dim, value dim).
        g: ``[..., H]`` float32 decay factor (``exp`` of the log-gate).
        beta: ``[..., H]`` float32 write strength.
        k: ``[..., G, D]`` float32 normalised keys, shared by ``H / G`` value heads per key head.
        v: ``[..., H, N]`` float32 values.

    Returns:
        ``[..., H, D, N]`` float32 new state.
    """
    per_group = S.shape[-3] // k.shape[-2]
    k_heads = np.repeat(k, per_group, axis=-2)  # [..., H, D]
    decayed = S * g[..., None, None]
    pred = np.zeros(v.shape, dtype=F32)
    for d in range(S.shape[-2]):  # a fixed, increasing order: the GPU kernel sums the same way
        pred = pred + decayed[..., d, :] * k_heads[..., d, None]
    delta = beta[..., None] * (v - pred)  # [..., H, N]
    return decayed + k_heads[..., :, None] * delta[..., None, :]


def conv_after(window: np.ndarray, columns: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """The conv windows after ``accepted`` more input columns: the last K of ``window ++ columns[:a]``.

    Args:
        window: ``[..., R, C, K]`` conv windows (any dtype).
        columns: ``[..., R, V, C]`` input columns of the same dtype.
        accepted: ``[R]`` ints in ``[0, V]``.

    Returns:
        ``[..., R, C, K]`` new windows (copies; the values move, no arithmetic).
    """
    width = window.shape[-1]
    full = np.concatenate([window, np.swapaxes(columns, -1, -2)], axis=-1)  # [..., R, C, K + V]
    take = (np.asarray(accepted)[:, None] + np.arange(width))[:, None, :]  # [R, 1, K]
    take = np.broadcast_to(take, full.shape[:-1] + (width,))
    return np.take_along_axis(full, take, axis=-1)


def replay_commit(
    recurrent: np.ndarray,
    conv: np.ndarray,
    stash: dict,
    field_shapes: dict,
    accept: np.ndarray,
    indices: Any,
    seq_len: int,
    mixer: str,
    nodes: Any = None,
    *,
    positions: Any = None,
    stochastic: bool = False,
    seed: int = 0,
    track: Any = None,
    scales: dict | None = None,
) -> None:
    """Replay each row's accepted steps from the stash into its slot, every layer, in place.

    Row ``b`` with ``a = accept[b]`` in ``[1, V]`` and slot ``s`` (``indices[b]``, or ``b``) in
    ``[0, B)``: ``recurrent[:, s]`` advances by steps ``0 .. a-1`` (stored to its dtype after every
    step, as the decode step stores it), and ``conv[:, s]`` becomes the last ``K`` columns of
    ``conv[:, s] ++ stash["conv"][:, b, :a]``. Other rows and slots are untouched.

    Args:
        recurrent: ``[L, B, H, D, N]`` main recurrent pool (updated in place).
        conv: ``[L, B, C, K]`` main conv pool (updated in place).
        stash: field name to ``[L, B*S*elems]`` flat pool; the verify pass wrote ``[active, V, ...]``
            from the start of each layer.
        field_shapes: field name to its per-step shape (``Config.replay_stash_fields`` shapes).
        accept: ``[active]`` int32 accept lengths; any value is safe.
        indices: ``[active]`` int32 slots, or None for slot = row; any value is safe.
        seq_len: V.
        mixer: ``"mamba2"`` or ``"gdn"``.
        nodes: optional ``[active, M]`` int32 accepted tree node ids (a tree commit): row ``b``
            replays the nodes ``nodes[b, :min(a, M)]`` in order instead of steps ``0 .. a-1``, and
            is skipped unless there is at least one and every one is in ``[0, V)``.
        positions: optional ``[active]`` int tokens row ``b``'s state had consumed before the verify
            pass (``p``); the state after replayed step ``t`` has consumed ``p + t + 1`` (0 when None).
        stochastic: round into a 16-bit recurrent dtype stochastically
            ([`mamba_cache.precision.convert`][mamba_cache.precision.reference.convert], keyed by layer, kind 0, that
            position and the element).
        seed: ``Config.rounding_seed``.
        track: optional ``(pools, entries, steps, check)``: prefix-store ``(recurrent [L, P, H, D, N],
            conv [L, P, C, K])`` (then, for an 8-bit cache, the entries of the ``scales`` pools it has:
            ``scales_recurrent``, ``scales_conv``, ``residual_recurrent``, in that order),
            ``[active]`` int entries and steps, and a callable that refuses a bad set of entries. A
            committing row with ``0 <= steps[b] < a`` and ``entries[b]`` in ``[0, P)`` copies its
            states after step ``steps[b]`` (as stored, with their scales and residuals) into that
            entry; a row that commits nothing tracks nothing.
        scales: the 8-bit pools beside 8-bit ``recurrent`` / ``conv`` pools (``Config.scale_pools``
            names: ``scales_recurrent [L, B, H, D]``, ``scales_conv [L, B, ceil(C / 64), K]``,
            ``residual_recurrent [L, B, H, D, N]``), updated in place with their states. An 8-bit
            recurrent state is read as ``stored * scale`` and every step is stored with
            [`mamba_cache.precision.quant8.store`][mamba_cache.precision.quant8.store] (its residual fed
            back when given); an 8-bit conv window moves its columns with their scales, the stash's
            ``conv_scales`` field giving the new columns'.

    Raises:
        ValueError: two committing rows name one slot, or ``check`` refuses the tracked entries
            (nothing changed).
    """
    layers, slots_total = recurrent.shape[:2]
    active = accept.shape[0]
    accepted = accept.astype(np.int64)
    slots = np.arange(active) if indices is None else indices.astype(np.int64)
    if nodes is None:  # a linear verify: row b replays stash steps 0 .. a-1
        steps = np.broadcast_to(np.arange(seq_len), (active, seq_len))
        ok = (accepted >= 1) & (accepted <= seq_len)
    else:  # a tree: row b replays its accepted path, every node of it in [0, V)
        width = nodes.shape[1]
        accepted = np.clip(accepted, 0, width)
        on_path = np.arange(width) < accepted[:, None]
        valid = (nodes >= 0) & (nodes < seq_len)
        ok = (accepted >= 1) & (valid | ~on_path).all(axis=1)
        steps = np.where(valid, nodes, 0).astype(np.int64)  # off-path entries are never used
    ok &= (slots >= 0) & (slots < slots_total)
    rows = np.flatnonzero(ok)
    targets, counts = np.unique(slots[rows], return_counts=True)
    if (counts > 1).any():  # the GPU gives no defined winner: the checked reference refuses
        raise ValueError(
            f"committing rows must name distinct slots; slot {int(targets[counts > 1][0])} is named "
            f"by {int(counts.max())} rows (state_indices); nothing was changed"
        )
    tracked = np.zeros(0, np.int64)
    if track is not None:
        track_pools, track_entries, track_steps, check = track
        entry_of, step_of = track_entries.astype(np.int64), track_steps.astype(np.int64)
        entries_total = track_pools[0].shape[1]
        on = (step_of[rows] >= 0) & (step_of[rows] < accepted[rows])
        on &= (entry_of[rows] >= 0) & (entry_of[rows] < entries_total)
        tracked = rows[on]
        check(entry_of[tracked])  # may refuse: nothing moved yet
    if rows.size == 0:
        return
    names = ["dA", "u", "B"] if mixer == "mamba2" else ["g", "beta", "k", "v"]
    step_fn = mamba2_step if mixer == "mamba2" else gdn_step
    views = {
        name: stash[name][:, : active * seq_len * int(np.prod(shape))].reshape(layers, active, seq_len, *shape)
        for name, shape in field_shapes.items()
    }
    a, targets, path = accepted[rows], slots[rows], steps[rows]
    dtype = recurrent.dtype
    scales = scales or {}
    quant = dtype.itemsize == 1  # an 8-bit recurrent pool: values with scales (and residuals)
    if quant:
        from ..precision.quant8 import dequantise, store

        q_values, q_scales = recurrent[:, targets], scales["scales_recurrent"][:, targets]
        residual = scales.get("residual_recurrent")
        q_residual = None if residual is None else residual[:, targets]
        state = dequantise(q_values, q_scales[..., None])
    else:
        state = recurrent[:, targets].astype(F32)  # [L, R, H, D, N]
    live_shape = (1, rows.size) + (1,) * (state.ndim - 2)
    start = np.zeros(rows.size, np.int64) if positions is None else positions.astype(np.int64)[rows]
    columns = views["conv"][:, rows[:, None], path]  # [L, R, T, C] in replay order
    column_scales = None  # an 8-bit window: each column's scales move with it
    if "conv_scales" in views:
        column_scales = views["conv_scales"][:, rows[:, None], path]  # [L, R, T, ceil(C / 64)]
    track_rows = np.searchsorted(rows, tracked)  # positions of the tracked rows within `rows`
    for t in range(int(a.max())):
        new = step_fn(state, *(views[name][:, rows, path[:, t]] for name in names))
        live = (a > t).reshape(live_shape)
        if quant:  # quantised after every step, with the scales and residual of that store
            layer = np.arange(layers)[:, None]
            q = store(
                new,
                dtype,
                stochastic=stochastic,
                seed=seed,
                layer=layer,
                position=(start + t + 1)[None],
                residual=q_residual,
            )
            q_values, q_scales = np.where(live, q.values, q_values), np.where(live[..., 0], q.scales, q_scales)
            if q_residual is not None:
                q_residual = np.where(live, q.residual, q_residual)
            state = np.where(live, dequantise(q.values, q.scales[..., None]), state)
        else:  # stored to the state dtype after every step, exactly as the decode step stores it
            stored = _store(new, dtype, stochastic, seed, start + t + 1)
            state = np.where(live, stored.astype(F32), state)
        at_t = track_rows[step_of[tracked] == t] if tracked.size else track_rows
        if at_t.size:  # the state after step t (as stored) and the window after t + 1 columns
            entries, shift = entry_of[rows[at_t]], np.full(at_t.size, t + 1)
            track_pools[0][:, entries] = q_values[:, at_t] if quant else state[:, at_t].astype(dtype)
            track_pools[1][:, entries] = conv_after(conv[:, targets[at_t]], columns[:, at_t], shift)
            named = dict(zip([n for n in SLOT_SCALE_POOLS if n in scales], track_pools[2:], strict=True))
            if quant:  # an 8-bit entry holds the step's scales and residuals as the slot would
                named["scales_recurrent"][:, entries] = q_scales[:, at_t]
                if q_residual is not None:
                    named["residual_recurrent"][:, entries] = q_residual[:, at_t]
            if column_scales is not None:
                window_scales = scales["scales_conv"][:, targets[at_t]]
                named["scales_conv"][:, entries] = conv_after(window_scales, column_scales[:, at_t], shift)
    if quant:
        recurrent[:, targets], scales["scales_recurrent"][:, targets] = q_values, q_scales
        if q_residual is not None:
            residual[:, targets] = q_residual
    else:
        recurrent[:, targets] = state.astype(dtype)
    conv[:, targets] = conv_after(conv[:, targets], columns, a)
    if column_scales is not None:
        scales["scales_conv"][:, targets] = conv_after(scales["scales_conv"][:, targets], column_scales, a)


def _store(values: np.ndarray, dtype: Any, stochastic: bool, seed: int, position: np.ndarray) -> np.ndarray:
    """``[L, R, ...]`` float32 states as a pool of ``dtype`` stores them (``position`` ``[R]``)."""
    if not rounds_stochastically(stochastic, dtype):
        return values.astype(dtype)
    from ..precision import convert

    flat = values.reshape(values.shape[0], values.shape[1], -1)
    layer = np.arange(values.shape[0])[:, None]
    out = convert(flat, dtype, stochastic=True, seed=seed, kind=0, layer=layer, position=position[None, :])
    return out.reshape(values.shape)
