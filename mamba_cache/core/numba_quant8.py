"""The Numba backend's commits into 8-bit pools: binds the kernels of `mamba_cache.precision` to its pools.

``commit``: the scatter and tree commits when a main pool is 8-bit (``quant8_kernels.commit8``). One
launch commits both kinds: an 8-bit kind copies (8-bit per-step states) or quantises (wider ones) its
values with their scales (and the recurrent residual under error feedback); the other kind copies its
bytes (its per-step dtype must then equal the main one; the Numba backend refuses other mixes).

``replay``: the replay commit, the checkpoint fold and the checkpoint reads into an 8-bit recurrent
state (``quant8_replay.replay8_mamba2`` / ``replay8_gdn``), tracked entries included.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..precision import quant8_kernels as q8k
from ..precision import quant8_replay as q8r
from ..precision.quant8 import SLOT_SCALE_POOLS, is_quant8

THREADS = q8k.COMMIT_THREADS
_SOURCES = {"float32": q8k.SRC_FLOAT32, "float16": q8k.SRC_FLOAT16, "bfloat16": q8k.SRC_BFLOAT16}
_SOURCES["float64"] = q8k.SRC_FLOAT64


def _rows(manager: Any, accept: Any, indices: Any, positions: Any, nodes: Any) -> tuple:
    """The row arguments of both kernels: accept, node_ids, state_indices, positions and their three flags."""
    placeholder = manager._placeholder().array
    node_ids = nodes.array if nodes is not None else placeholder.reshape((placeholder.size, 1))
    arrays = (placeholder if a is None else getattr(a, "array", a) for a in (indices, positions))
    flags = (int(a is not None) for a in (indices, nodes, positions))
    return (getattr(accept, "array", accept), node_ids, *arrays, *flags)


def _placeholders(manager: Any) -> dict:
    """The stand-ins for the arrays a launch does not use (absent scale pools, tracking off), made once."""
    if manager._quant8_placeholder is None:
        from numba import cuda

        manager._quant8_placeholder = {
            "recurrent": cuda.device_array((1, 1, 1), np.float32),
            "conv": cuda.device_array((1, 1, 1, 1), np.float32),
            "residual": cuda.device_array((1, 1, 1, 1), np.uint16),
            "stash_conv_scales": cuda.device_array((1, 1, 1), np.float32),
            "track_rec": cuda.device_array((1, 1, 1, 1), np.uint8),
            "track_entries": cuda.device_array(1, np.int32),
        }
    return manager._quant8_placeholder


def check_config(config: Any) -> None:
    """Refuse the 8-bit configs the Numba backend does not build yet (``ConfigError`` naming the field)."""
    from .._config import ConfigError

    if not config.quantised_kinds:
        return
    replay = config.commit_mode != "scatter" and "recurrent" in config.quantised_kinds
    if config.commit_mode != "scatter" and not replay:
        raise ConfigError(
            f"8-bit states with commit_mode={config.commit_mode!r} and a {config.recurrent_state_dtype.name} "
            "recurrent state (8-bit conv only) are not built yet for the Numba backend (its scatter and tree commits "
            "are, and the replay commit and checkpoint fold into an 8-bit recurrent state; the NumPy reference has all)"
        )
    if replay and config.recurrent_state_size > q8r.REPLAY_MAX_N:
        raise ConfigError(
            f"recurrent_state_size must be <= {q8r.REPLAY_MAX_N} for the Numba replay commit and checkpoint fold into "
            f"an 8-bit state, "
            f"got {config.recurrent_state_size}"
        )
    for kind in ("recurrent", "conv"):
        main, inter = getattr(config, f"{kind}_state_dtype"), getattr(config, f"intermediate_{kind}_state_dtype")
        if main.itemsize != 1 and main != inter:
            raise ConfigError(
                f"intermediate_{kind}_state_dtype must equal {kind}_state_dtype ({main.name}) on the Numba backend "
                f"when the other kind is 8-bit, got {inter.name} (one launch commits both kinds; the NumPy "
                "reference converts this mix)"
            )


def _kind(manager: Any, kind: str) -> tuple:
    """(main, main scales, per-step, per-step scales, mode, code, source) of one kind, as ``commit8`` takes them."""
    config, pools, scales = manager._config, manager._pools, manager._scales
    layers, slots, steps = config.num_recurrent_layers, config.max_batch_size, config.max_intermediate_seq_len
    main, inter = getattr(pools, kind), getattr(pools, f"intermediate_{kind}")
    main_dtype = getattr(config, f"{kind}_state_dtype")
    inter_dtype = getattr(config, f"intermediate_{kind}_state_dtype")
    empty = manager._quant8_placeholder
    if not is_quant8(main_dtype):  # bytes, [L, rows, 1, bytes]
        as_bytes = [
            pool.reshape(layers, rows, pool.size // (layers * rows)).view(np.uint8).reshape(layers, rows, 1, -1)
            for pool, rows in ((main, slots), (inter, slots * steps))
        ]
        return as_bytes[0], empty[kind], as_bytes[1], empty[kind], q8k.COMMIT_BYTES, 0, 0
    if kind == "recurrent":
        groups = config.recurrent_state_num_heads * config.recurrent_state_head_dim
        per_slot = (groups, config.recurrent_state_size)
        scale_shape = (groups,)
    else:
        per_slot = (config.conv_dim, config.conv_kernel)
        scale_shape = config.conv_scale_shape[1:]
    main_view = main.reshape(layers, slots, *per_slot).view(np.uint8)
    inter_view = inter.reshape(layers, slots * steps, *per_slot)
    main_scales = scales[f"scales_{kind}"].reshape(layers, slots, *scale_shape)
    if inter_dtype == main_dtype:
        inter_scales = scales[f"scales_intermediate_{kind}"].reshape(layers, slots * steps, *scale_shape)
        return main_view, main_scales, inter_view.view(np.uint8), inter_scales, q8k.COMMIT_COPY8, 0, 0
    code = q8k.dtype_code(main_dtype)
    return main_view, main_scales, inter_view, empty[kind], q8k.COMMIT_QUANTISE, code, _SOURCES[inter_dtype.name]


def commit(
    manager: Any,
    accept: Any,
    indices: Any,
    active: int,
    seq_len: int,
    max_accept: int,
    stream: Any,
    positions: Any = None,
    nodes: Any = None,
    track: tuple | None = None,
) -> None:
    """Launch ``commit8`` for a scatter (``nodes`` None) or tree commit; arguments as the backend's ``_scatter``.

    ``track``: ``(targets, entries, steps)``: the scatter's tracking instead of its commit (launched before
    it), into the targets (a prefix store's entry pools, `_moving_pools` order).
    """
    config = manager._config
    _placeholders(manager)
    rec, rec_scales, inter_rec, inter_rec_scales, rec_mode, rec_code, rec_src = _kind(manager, "recurrent")
    conv, conv_scales, inter_conv, inter_conv_scales, conv_mode, conv_code, conv_src = _kind(manager, "conv")
    residual = manager._scales.get("residual_recurrent")
    if residual is None:
        residual = manager._quant8_placeholder["residual"]
    else:
        residual = residual.reshape(rec.shape[0], rec.shape[1], rec.shape[2], rec.shape[3])
    warps = THREADS // 32  # a warp a recurrent group or conv block; COMMIT_BYTES spreads bytes over threads
    units = max(
        -(-rec.shape[3] // THREADS) if rec_mode == q8k.COMMIT_BYTES else -(-rec.shape[2] // warps),
        -(-conv.shape[3] // THREADS) if conv_mode == q8k.COMMIT_BYTES else -(-conv_scales.shape[2] // warps),
    )
    grid = (units, active, config.num_recurrent_layers)
    seed = config.rounding_seed
    dst = (rec, rec_scales, residual, conv, conv_scales)
    entries = steps = manager._quant8_placeholder["track_entries"]
    if track is not None:
        dst = _entry_views(manager, track[0], (rec_mode, conv_mode), dst)
        entries, steps = (getattr(a, "array", a) for a in track[1:])
    rows = _rows(manager, accept, indices, positions, nodes)
    q8k.commit8[grid, THREADS, stream.stream](
        rec,
        rec_scales,
        residual,
        inter_rec,
        inter_rec_scales,
        conv,
        conv_scales,
        inter_conv,
        inter_conv_scales,
        *dst,
        *rows[:4],
        entries,
        steps,
        *rows[4:],
        int(track is not None),
        seq_len,
        max_accept,
        rec_mode,
        rec_code,
        rec_src,
        conv_mode,
        conv_code,
        conv_src,
        int(config.error_feedback),
        int(config.stochastic_rounding),
        seed & 0xFFFFFFFF,
        seed >> 32,
    )


def _entry_views(manager: Any, targets: tuple, modes: tuple, main: tuple) -> tuple:
    """A prefix store's entries (``[L, P, ...]``, `_moving_pools` order) as ``commit8``'s ``dst_*`` arrays.

    ``main``: the main pools' ``dst_*`` arrays, whose placeholders stand in for the pools the cache lacks.
    """
    layers, entries = targets[0].shape[:2]
    extra = dict(zip([n for n in SLOT_SCALE_POOLS if n in manager._scales], targets[2:], strict=True))
    views = []
    for target, mode, main_view, main_scales in zip(targets[:2], modes, main[::3], main[1::3], strict=True):
        if mode == q8k.COMMIT_BYTES:
            views += [target.reshape(layers, entries, -1).view(np.uint8).reshape(layers, entries, 1, -1), main_scales]
            continue
        scales = extra["scales_recurrent" if target is targets[0] else "scales_conv"]
        views += [target.reshape(main_view.shape[0], entries, *main_view.shape[2:]).view(np.uint8),
                  scales.reshape(layers, entries, *main_scales.shape[2:])]  # fmt: skip
    residual = extra.get("residual_recurrent")
    residual = main[2] if residual is None else residual.reshape(layers, entries, *main[2].shape[2:])
    return views[0], views[1], residual, views[2], views[3]


def _track_views(manager: Any, targets: tuple, conv8: bool) -> tuple:
    """Tracking targets (stacks ``[L, X, ...]`` in `_moving_pools` order) as the 8-bit replay kernels take them."""
    config, empty = manager._config, manager._quant8_placeholder
    layers, entries = targets[0].shape[:2]
    groups = config.recurrent_state_num_heads * config.recurrent_state_head_dim
    extra = dict(zip([n for n in SLOT_SCALE_POOLS if n in manager._scales], targets[2:], strict=True))
    residual = extra.get("residual_recurrent")
    return (
        targets[0].reshape(layers, entries, groups, config.recurrent_state_size).view(np.uint8),
        extra["scales_recurrent"].reshape(layers, entries, groups),
        empty["residual"] if residual is None else residual.reshape(layers, entries, groups, -1),
        targets[1].reshape(layers, entries, config.conv_dim, -1).view(np.uint8),
        extra["scales_conv"] if conv8 else empty["conv"],
    )


def replay(
    manager: Any,
    accept: Any,
    indices: Any,
    active: int,
    seq_len: int,
    stream: Any,
    nodes: Any = None,
    positions: Any = None,
    *,
    ring: bool = False,
    write_back: bool = True,
    track: tuple | None = None,
) -> None:
    """Launch ``replay8_mamba2`` or ``replay8_gdn`` over the stash, or (``ring``) the history ring.

    Arguments as the backend's ``_replay`` hook; ``positions`` may also be a raw int64 ``[B]`` device array
    (the ring's rounding base, indexed by slot). ``track``: ``(targets, entries, steps)``, the targets
    ``[L, X, ...]`` stacks in `_moving_pools` order (a prefix store's entries, or a read's destinations).
    ``ring`` / ``write_back``: see [`mamba_cache.precision.quant8_replay`][mamba_cache.precision.quant8_replay].
    """
    config, pools, scales = manager._config, manager._pools, manager._scales
    layers, slots = config.num_recurrent_layers, config.max_batch_size
    empty = _placeholders(manager)
    heads = config.recurrent_state_num_heads
    groups = heads * config.recurrent_state_head_dim
    rec = pools.recurrent.reshape(layers, slots, groups, config.recurrent_state_size).view(np.uint8)
    rec_scales = scales["scales_recurrent"].reshape(layers, slots, groups)
    residual = scales.get("residual_recurrent")
    residual = empty["residual"] if residual is None else residual.reshape(rec.shape)
    conv8 = is_quant8(config.conv_state_dtype)
    esz = config.conv_state_dtype.itemsize
    conv = pools.conv.reshape(layers, slots, config.conv_dim, -1).view(np.uint8)
    stash = manager._history if ring else manager._stash
    rows = slots * (config.history_len if ring else config.max_intermediate_seq_len)
    fields = {
        name: stash[name].reshape(layers, rows, *shape) for name, (shape, _) in config.replay_stash_fields.items()
    }
    if config.mixer == "mamba2":
        kernel = q8r.replay8_mamba2
        mixer_fields = (fields["dA"], fields["u"].reshape(layers, rows, groups), fields["B"])
    else:
        kernel = q8r.replay8_gdn
        mixer_fields = (fields["g"], fields["beta"], fields["k"], fields["v"])
    if track is None:
        tracked = (empty["track_rec"], empty["recurrent"], empty["residual"], empty["track_rec"], empty["conv"])
        entries = steps = empty["track_entries"]
    else:
        tracked = _track_views(manager, track[0], conv8)
        entries, steps = (getattr(a, "array", a) for a in track[1:])
    warps = q8k.COMMIT_THREADS // 32
    conv_units = -(-config.conv_scale_blocks // warps)
    units = max(-(-groups // warps), conv_units) if config.mixer == "mamba2" else heads + conv_units
    row_args = _rows(manager, accept, indices, positions, nodes)
    seed = config.rounding_seed
    kernel[(units, active, layers), q8k.COMMIT_THREADS, stream.stream](
        rec,
        rec_scales,
        residual,
        conv,
        scales["scales_conv"] if conv8 else empty["conv"],
        *mixer_fields,
        fields["conv"].view(np.uint8).reshape(layers, rows, config.conv_dim * esz),
        fields["conv_scales"] if conv8 else empty["stash_conv_scales"],
        *row_args[:4],
        *tracked,
        entries,
        steps,
        *row_args[4:],
        int(track is not None),
        int(ring),
        int(write_back),
        seq_len,
        heads,
        q8k.dtype_code(config.recurrent_state_dtype),
        int(conv8),
        esz,
        int(config.error_feedback),
        int(config.stochastic_rounding),
        seed & 0xFFFFFFFF,
        seed >> 32,
    )
