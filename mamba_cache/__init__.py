"""mamba_cache: recurrent-state caching for hybrid Mamba / linear-attention LLMs.

A Python implementation of NVIDIA TensorRT-Edge-LLM's C++ ``MambaCacheManager``:

- [`NumpyMambaCacheManager`][mamba_cache.NumpyMambaCacheManager], the NumPy reference that defines the exact semantics;
- [`NumbaMambaCacheManager`][mamba_cache.NumbaMambaCacheManager], the same interface on CUDA device arrays through Numba
  (imported lazily: ``import mamba_cache`` needs NumPy only).

Both take a [`Config`][mamba_cache.Config]. See ``docs/`` for the state layouts and the MTP scatter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._config import Config, ConfigError, format_bytes
from ._target import gpu_present, select_numba_target
from .core.checks import pad_slot_id
from .core.manager import MambaCacheManagerBase
from .core.numpy_backend import NumpyMambaCacheManager
from .moving import ParcelError, StateParcel
from .precision import bfloat16
from .prefix import PrefixHandle, PrefixStateCache, PrefixStats
from .snapshot import SnapshotError, load_snapshot, save_snapshot

if TYPE_CHECKING:
    from .core.numba_backend import NumbaMambaCacheManager

__all__ = [
    "Config",
    "ConfigError",
    "MambaCacheManagerBase",
    "NumbaMambaCacheManager",
    "NumpyMambaCacheManager",
    "ParcelError",
    "PrefixHandle",
    "PrefixStateCache",
    "PrefixStats",
    "SnapshotError",
    "StateParcel",
    "bfloat16",
    "format_bytes",
    "gpu_present",
    "load_snapshot",
    "pad_slot_id",
    "save_snapshot",
    "select_numba_target",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # The Numba backend pulls in numba and the CUDA bindings: load it only when asked for.
    if name == "NumbaMambaCacheManager":
        from .core.numba_backend import NumbaMambaCacheManager

        return NumbaMambaCacheManager
    raise AttributeError(f"module 'mamba_cache' has no attribute {name!r}")
