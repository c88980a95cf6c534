"""Binds the converting commit kernels to a :class:`NumbaMambaCacheManager` (imports numba).

Chosen by the Numba backend when a main pool's dtype differs from its per-step pool's; equal
dtypes keep the word-copy kernels of :mod:`mamba_cache.core.kernels` untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from . import kernels
from .reference import dtype_format


def formats(config: Any) -> np.ndarray:
    """The ``[10]`` int32 ``formats`` argument: ``mode, src_e, src_m, dst_e, dst_m`` per kind."""
    values = []
    for kind in ("recurrent", "conv"):
        main, inter = getattr(config, f"{kind}_state_dtype"), getattr(config, f"intermediate_{kind}_state_dtype")
        if main == inter:
            mode = kernels.MODE_COPY
        elif config.stochastic_rounding and main.itemsize == 2 and inter.itemsize >= 4:
            mode = kernels.MODE_STOCHASTIC
        else:
            mode = kernels.MODE_NEAREST
        values += [mode, *dtype_format(inter), *dtype_format(main)]
    return np.array(values, dtype=np.int32)


def _elements(pool: Any, rows: int) -> Any:
    """A stacked pool ``[L, ...]`` as ``[L, rows, E]`` unsigned bit patterns of its element size."""
    layers = pool.shape[0]
    flat = pool.reshape(layers, rows, pool.size // (layers * rows))
    return flat.view(np.dtype(f"u{pool.dtype.itemsize}"))


def _launch(manager: Any, tree: bool) -> tuple:
    """(prepared launch, x blocks, layers) of the converting commit, built once per manager."""
    from ..core.numba_backend import _Launch

    key = "precision_tree" if tree else "precision_scatter"
    entry = manager._launches.get(key)
    if entry is None:
        pools, config = manager._pools, manager._config
        slots = config.max_batch_size
        steps = slots * config.max_intermediate_seq_len
        arrays = []
        for kind in ("recurrent", "conv"):
            arrays += [_elements(getattr(pools, kind), slots), _elements(getattr(pools, f"intermediate_{kind}"), steps)]
        (chunks_a, chunks_b), threads = kernels.launch_shape(arrays[0].shape[2], arrays[2].shape[2])
        placeholder = manager._placeholder().array
        manager._precision_formats = cuda.to_device(formats(config))
        seed = config.rounding_seed
        tail = (placeholder, manager._precision_formats, seed & 0xFFFFFFFF, seed >> 32)
        if tree:  # node_ids, accept_lengths, state_indices, use_indices, seq_len
            rest = (placeholder.reshape((placeholder.size, 1)), placeholder, placeholder, 0, 1)
            kernel = kernels.scatter_tree_convert
        else:  # accept_lengths, state_indices, use_indices, seq_len, max_accept
            rest = (placeholder, placeholder, 0, 1, 1)
            kernel = kernels.scatter_convert
        launch = _Launch(kernel, (*arrays, chunks_a, *rest, *tail), threads)
        entry = manager._launches[key] = (launch, chunks_a + chunks_b, config.num_recurrent_layers)
    return entry


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
    launch, blocks, layers = _launch(manager, tree=False)
    launch.set_array("accept_lengths", accept, shape_changes=True)
    manager._set_indices(launch, indices)
    launch.set_array("positions", manager._placeholder() if positions is None else positions, shape_changes=True)
    launch.set_scalar("seq_len", seq_len)
    launch.set_scalar("max_accept", max_accept)
    launch.launch((blocks, active, layers), stream)


def scatter_tree(
    manager: Any, nodes: Any, accept: Any, indices: Any, active: int, seq_len: int, stream: Any, positions: Any
) -> None:
    """The converting ``scatter_accepted_tree_states`` (arguments as the backend's ``_scatter_tree`` hook)."""
    launch, blocks, layers = _launch(manager, tree=True)
    launch.set_array("node_ids", nodes, shape_changes=True)
    launch.set_array("accept_lengths", accept, shape_changes=True)
    manager._set_indices(launch, indices)
    launch.set_array("positions", manager._placeholder() if positions is None else positions, shape_changes=True)
    launch.set_scalar("seq_len", seq_len)
    launch.launch((blocks, active, layers), stream)
