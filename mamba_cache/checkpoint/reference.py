"""The checkpoint mode in NumPy: the state of a slot after ``steps`` steps of its history ring.

Letters: ``L`` layers, ``B`` slots, ``R`` ring steps (``Config.history_len``), ``H, D, N`` the
recurrent state, ``C, K`` conv channels and width, ``G`` groups, ``n`` the slots asked about.

Slot ``s`` holds a checkpoint in the main pools (the state after ``p0[s]`` tokens) and, in its
ring ``history[name][:, s, j]``, the replay stash of the steps after it: ring step ``j`` is the
step from ``p0 + j`` to ``p0 + j + 1`` tokens. The state after ``j`` ring steps is the checkpoint
advanced through ring steps ``0 .. j - 1`` exactly as the replay commit advances a slot through
its stash ([`replay_commit`][mamba_cache.replay.reference.replay_commit]: float32 compute, stored
to the state dtype after every step, the same order of operations, the conv window the last ``K``
columns of ``window ++ columns``), a stochastic rounding at ring step ``j`` keyed by the token
position ``p0 + j + 1``. It is computed by that function itself, so the bits are the replay
commit's, and they never depend on when the folds happen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._config import Config
from ..replay.reference import replay_commit

__all__ = ["fold", "history_views", "state_after"]


def history_views(config: Config, history: dict) -> dict:
    """The flat ring pools as ``[L, B, R, ...]`` views, by field name.

    Args:
        config: the cache's config (checkpoint mode).
        history: field name to the ``[L, B*R*elems]`` flat pool (``Config.replay_stash_fields``).

    Returns:
        Field name to a ``[L, B, R, *shape]`` view of the same memory (slot, then ring step).
    """
    layers, slots, ring = config.num_recurrent_layers, config.max_batch_size, config.history_len
    return {
        name: history[name].reshape(layers, slots, ring, *shape)
        for name, (shape, _) in config.replay_stash_fields.items()
    }


def state_after(
    config: Config,
    recurrent: np.ndarray,
    conv: np.ndarray,
    history: dict,
    slots: Any,
    steps: Any,
    positions: Any,
    *,
    scales: dict | None = None,
) -> tuple:
    """The state of each given slot after ``steps`` ring steps past its checkpoint; the pools are not changed.

    Args:
        config: the cache's config (``commit_mode="checkpoint"``): mixer, dtypes, rounding.
        recurrent: ``[L, B, H, D, N]`` main recurrent pool (the checkpoints), recurrent dtype.
        conv: ``[L, B, C, K]`` main conv pool (the checkpoints' windows), conv dtype.
        history: field name to the ring, either the ``[L, B*R*elems]`` flat pools or ``[L, B, R, ...]``
            views of them (``Config.replay_stash_fields``: float32 fields and the conv column
            ``[C]`` in the conv dtype).
        slots: ``[n]`` ints in ``[0, B)``, distinct.
        steps: ``[n]`` ints in ``[0, R]``: ring steps to advance each slot by (0: the checkpoint).
        positions: ``[n]`` ints, ``p0`` of each slot (tokens its checkpoint has consumed): ring
            step ``j`` stores with the stochastic-rounding key ``p0 + j + 1`` (unused unless the
            config rounds stochastically into a 16-bit or 8-bit recurrent state).
        scales: an 8-bit cache's scale and residual pools (``Config.scale_pools`` names, ``[L, B, ...]``);
            required with 8-bit states, whose values mean nothing without them.

    Returns:
        ``(recurrent [L, n, H, D, N], conv [L, n, C, K])``: new arrays in the pools' dtypes; with
        ``scales``, a third item: the slots' scales and residuals, ``{name: [L, n, ...]}``.

    Raises:
        ValueError: a slot outside ``[0, B)``, repeated, or a step count outside ``[0, R]``.
    """
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    count, ring = slots.size, config.history_len
    if steps.size != count or positions.size != count:
        raise ValueError(
            f"slots, steps and positions must have one length, got {count}, {steps.size}, {positions.size}"
        )
    if ((slots < 0) | (slots >= config.max_batch_size)).any() or np.unique(slots).size != count:
        raise ValueError(f"slots must be distinct and in [0, {config.max_batch_size}), got {slots.tolist()}")
    if ((steps < 0) | (steps > ring)).any():
        raise ValueError(f"steps must be in [0, {ring}] (history_len), got {steps.tolist()}")
    views = history_views(config, history) if next(iter(history.values())).ndim == 2 else history
    layers = recurrent.shape[0]
    # The selected slots' rings, as the replay stash of `count` rows of R steps: row i is slot slots[i].
    stash = {name: np.ascontiguousarray(view[:, slots]).reshape(layers, -1) for name, view in views.items()}
    shapes = {name: shape for name, (shape, _) in config.replay_stash_fields.items()}
    out_recurrent, out_conv = recurrent[:, slots].copy(), conv[:, slots].copy()
    out_scales = None if scales is None else {name: pool[:, slots].copy() for name, pool in scales.items()}
    if count:
        replay_commit(
            out_recurrent,
            out_conv,
            stash,
            shapes,
            steps,
            None,
            ring,
            config.mixer,
            positions=positions,
            stochastic=config.stochastic_rounding,
            seed=config.rounding_seed,
            scales=out_scales,
        )
    return (out_recurrent, out_conv) if scales is None else (out_recurrent, out_conv, out_scales)


def fold(
    config: Config,
    recurrent: np.ndarray,
    conv: np.ndarray,
    history: dict,
    slots: Any,
    steps: Any,
    positions: Any,
    *,
    scales: dict | None = None,
) -> None:
    """Advance each given slot's checkpoint by ``steps`` ring steps, in place (``state_after`` written back).

    The caller moves the slots' ``p0`` on by ``steps`` and sets their ``h`` to 0 (the ring is then
    free from step 0). Arguments as in [`state_after`][mamba_cache.checkpoint.reference.state_after];
    an 8-bit cache's ``scales`` are written back too.
    """
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    new = state_after(config, recurrent, conv, history, slots, steps, positions, scales=scales)
    recurrent[:, slots] = new[0]
    conv[:, slots] = new[1]
    for name, pool in (scales or {}).items():
        pool[:, slots] = new[2][name]
