"""The NumPy reference backend: the executable definition of the cache semantics.

Every operation is a few vectorised NumPy statements over the stacked pools (``[L, B, ...]``),
so the whole contract reads in one sitting. The Numba backend must match it bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._manager import MambaCacheManagerBase, check_accept_lengths

__all__ = ["NumpyMambaCacheManager"]


class NumpyMambaCacheManager(MambaCacheManagerBase):
    """Per-layer Mamba (recurrent + conv) state manager on host NumPy arrays: the reference.

    Each recurrent layer owns a recurrent state ``[B, H, D, N]`` and a conv state ``[B, C, K]``;
    with ``max_intermediate_seq_len = S > 0`` also MTP intermediate states ``[B, S, H, D, N]`` and
    ``[B, S, C, K]``. All are zero-initialised ``numpy.ndarray`` views of one allocation per state
    kind. ``num_recurrent_layers == 0`` (or no config) makes the manager a no-op.

    ``stream`` arguments are accepted for interface parity with the Numba backend and ignored.

    Args:
        config: the cache configuration; ``None`` builds an empty manager.
        stream: ignored.

    Raises:
        TypeError: ``config`` is not a :class:`mamba_cache.Config`.
        MemoryError: the pools would not fit in physical RAM (checked before allocating).

    Example:
        >>> import numpy as np
        >>> from mamba_cache import Config, NumpyMambaCacheManager
        >>> cfg = Config(num_recurrent_layers=2, max_batch_size=4, recurrent_state_num_heads=2,
        ...              recurrent_state_head_dim=4, recurrent_state_size=8, conv_dim=16,
        ...              conv_kernel=4, max_intermediate_seq_len=3)
        >>> cache = NumpyMambaCacheManager(cfg)
        >>> cache.get_recurrent_state(0).shape
        (4, 2, 4, 8)
        >>> cache.reshape_intermediate_states(2, 3)
        >>> cache.get_intermediate_conv_state(1).shape
        (2, 3, 16, 4)
        >>> cache.scatter_mtp_states(np.array([2, 0], dtype=np.int32))
    """

    backend = "numpy"

    def _stream(self, stream: Any) -> Any:
        return None

    def _available_bytes(self) -> tuple[int, str]:
        # np.zeros only reserves address space; a config larger than RAM would fail at first touch
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX: let NumPy decide
            return 2**63 - 1, "host memory"
        return physical, "host memory (physical RAM)"

    def _zeros(self, shape: tuple, dtype: np.dtype, stream: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def _zero_fill(self, pool_a: np.ndarray, pool_b: np.ndarray, stream: Any) -> None:
        pool_a[...] = 0
        pool_b[...] = 0

    def _capture(self, pool: np.ndarray, slot: int, stream: Any) -> np.ndarray:
        return pool[:, slot : slot + 1].copy()

    def _as_accept_lengths(self, accept_lengths: Any, stream: Any) -> tuple[np.ndarray, int]:
        if hasattr(accept_lengths, "__cuda_array_interface__"):
            raise TypeError(
                "accept_lengths must be a host numpy.ndarray for the NumPy backend, got a device array "
                f"({type(accept_lengths).__name__}); copy it to the host first"
            )
        if not isinstance(accept_lengths, np.ndarray):
            raise TypeError(f"accept_lengths must be a numpy.ndarray of int32, got {type(accept_lengths).__name__}")
        contiguous = accept_lengths.ndim != 1 or accept_lengths.shape[0] <= 1 or accept_lengths.strides[0] == 4
        active = check_accept_lengths(accept_lengths.dtype, accept_lengths.shape, contiguous, self._config.max_batch_size)
        return accept_lengths, active

    def _scatter(self, accept_lengths: np.ndarray, active: int, seq_len: int, stream: Any) -> None:
        # Row b commits step accept_lengths[b] - 1 when that is a partial accept (0 <= step < V-1).
        # The intermediate buffer of a layer is [active, V, elems] from its start, so (b, step) is
        # row b * V + step of it seen as [B * S, elems]. int64 keeps INT32_MIN - 1 from wrapping.
        step = accept_lengths.astype(np.int64) - 1
        rows = np.flatnonzero((step >= 0) & (step < seq_len - 1))
        src_rows = rows * seq_len + step[rows]
        pools = self._pools
        for pool, inter in ((pools.recurrent, pools.intermediate_recurrent), (pools.conv, pools.intermediate_conv)):
            layers, slots = pool.shape[:2]
            dst = pool.reshape(layers, slots, -1)
            src = inter.reshape(layers, -1, dst.shape[2])
            dst[:, rows] = src[:, src_rows]
