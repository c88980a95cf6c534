"""The Numba backend's converting commits: binds ``mamba_cache.precision``'s kernels to its pools.

Chosen by the Numba backend when a main pool's dtype differs from its per-step pool's; equal
dtypes keep the word-copy kernels of [`mamba_cache.core.kernels`][mamba_cache.core.kernels] untouched. The kernels are
built per dtype pair by `mamba_cache.precision.commit_kernels.commit_kernels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..precision import commit_kernels, kernels
from ..precision.reference import dtype_format, rounds_stochastically
from .device import Launch

KINDS = ("recurrent", "conv")


def formats(config: Any) -> np.ndarray:
    """The ``[10]`` int32 ``mode, src_e, src_m, dst_e, dst_m`` per kind (recurrent, then conv)."""
    values = []
    for kind in KINDS:
        main, inter = getattr(config, f"{kind}_state_dtype"), getattr(config, f"intermediate_{kind}_state_dtype")
        if main == inter:
            mode = kernels.MODE_COPY
        elif rounds_stochastically(config.stochastic_rounding, main, inter):
            mode = kernels.MODE_STOCHASTIC
        else:
            mode = kernels.MODE_NEAREST
        values += [mode, *dtype_format(inter), *dtype_format(main)]
    return np.array(values, dtype=np.int32)


def specs(config: Any) -> tuple[tuple, tuple]:
    """The two kinds' kernel specs (`mamba_cache.precision.commit_kernels.spec_of`)."""
    fmt = formats(config).tolist()
    out = []
    for i, kind in enumerate(KINDS):
        main, inter = getattr(config, f"{kind}_state_dtype"), getattr(config, f"intermediate_{kind}_state_dtype")
        elems = getattr(config, f"{kind}_slot_elems")
        mode, se, sm, de, dm = fmt[5 * i : 5 * i + 5]
        out.append(commit_kernels.spec_of(mode, (se, sm), (de, dm), inter.itemsize, main.itemsize, elems))
    return out[0], out[1]


def _view(pool: Any, rows: int, wide: bool) -> Any:
    """A stacked pool ``[L, ...]`` as ``[L, rows, W]``: uint64 words (``wide``) or element-size unsigned ints."""
    layers = pool.shape[0]
    elems = pool.size // (layers * rows)
    flat = pool.reshape(layers, rows, elems)
    return flat.view(np.dtype(np.uint64) if wide else np.dtype(f"u{pool.dtype.itemsize}"))


def _launch(manager: Any, variant: str, store: Any = None) -> tuple:
    """(prepared launch, x blocks, layers) of a converting commit, built once per manager (and store)."""
    key = ("precision", variant, None if store is None else id(store.entry_pools[0]))
    entry = manager._launches.get(key)
    if entry is None:
        pools, config = manager._pools, manager._config
        slots = config.max_batch_size
        steps = slots * config.max_intermediate_seq_len
        spec_a, spec_b = specs(config)
        arrays = []
        for kind, spec in zip(KINDS, (spec_a, spec_b), strict=True):
            arrays += [
                _view(getattr(pools, kind), slots, spec[7]),
                _view(getattr(pools, f"intermediate_{kind}"), steps, spec[7]),
            ]
        elems = (config.recurrent_slot_elems, config.conv_slot_elems)
        (chunks_a, chunks_b), threads = commit_kernels.launch_shape((spec_a, spec_b), elems)
        built = commit_kernels.commit_kernels(spec_a, spec_b)
        placeholder = manager._placeholder().array
        seed = config.rounding_seed
        seeds = (seed & 0xFFFFFFFF, seed >> 32)
        if variant == "tree":  # node_ids, accept_lengths, state_indices, use_indices, seq_len, positions
            args = (*arrays, chunks_a, placeholder.reshape((placeholder.size, 1)), placeholder, placeholder, 0, 1)
            args = (*args, placeholder, *seeds)
        else:  # accept_lengths, state_indices, use_indices, seq_len, max_accept, positions
            args = (*arrays, chunks_a, placeholder, placeholder, 0, 1, 1, placeholder, *seeds)
        if variant == "tracked":  # the store's entries in the main dtypes, viewed as the main pools are
            tracks = [
                _view(track, track.shape[1], spec[7])
                for track, spec in zip(store.entry_pools, (spec_a, spec_b), strict=True)
            ]
            args = (*args, *tracks, placeholder, placeholder)
        kernel = {"scatter": built.scatter, "tree": built.tree, "tracked": built.tracked}[variant]
        launch = Launch(kernel, args, threads)
        entry = manager._launches[key] = (launch, chunks_a + chunks_b, config.num_recurrent_layers)
    return entry


def _set_positions(manager: Any, launch: Any, positions: Any) -> None:
    launch.set_array("positions", manager._placeholder() if positions is None else positions, shape_changes=True)


def scatter(
    manager: Any,
    accept: Any,
    indices: Any,
    active: int,
    seq_len: int,
    max_accept: int,
    stream: Any,
    positions: Any,
) -> None:
    """The converting ``scatter_mtp_states`` (arguments as the backend's ``_scatter`` hook)."""
    launch, blocks, layers = _launch(manager, "scatter")
    launch.set_array("accept_lengths", accept, shape_changes=True)
    manager._set_indices(launch, indices)
    _set_positions(manager, launch, positions)
    launch.set_scalar("seq_len", seq_len)
    launch.set_scalar("max_accept", max_accept)
    launch.launch((blocks, active, layers), stream)


def scatter_tree(
    manager: Any, nodes: Any, accept: Any, indices: Any, active: int, seq_len: int, stream: Any, positions: Any
) -> None:
    """The converting ``scatter_accepted_tree_states`` (arguments as the backend's ``_scatter_tree`` hook)."""
    launch, blocks, layers = _launch(manager, "tree")
    launch.set_array("node_ids", nodes, shape_changes=True)
    launch.set_array("accept_lengths", accept, shape_changes=True)
    manager._set_indices(launch, indices)
    _set_positions(manager, launch, positions)
    launch.set_scalar("seq_len", seq_len)
    launch.launch((blocks, active, layers), stream)


def scatter_tracked(
    manager: Any,
    accept: Any,
    indices: Any,
    active: int,
    seq_len: int,
    max_accept: int,
    store: Any,
    entries: Any,
    steps: Any,
    stream: Any,
    positions: Any,
) -> None:
    """The converting tracked commit (arguments as the backend's ``_scatter_tracked`` hook, plus ``positions``)."""
    launch, blocks, layers = _launch(manager, "tracked", store)
    launch.set_array("accept_lengths", accept, shape_changes=True)
    manager._set_indices(launch, indices)
    _set_positions(manager, launch, positions)
    launch.set_array("track_entries", entries, shape_changes=True)
    launch.set_array("track_steps", steps, shape_changes=True)
    launch.set_scalar("seq_len", seq_len)
    launch.set_scalar("max_accept", max_accept)
    launch.launch((blocks, active, layers), stream)
