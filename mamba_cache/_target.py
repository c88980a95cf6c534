"""Choosing Numba's target before Numba is imported: the GPU if there is one, else the simulator."""

from __future__ import annotations

import ctypes
import os

__all__ = ["gpu_present", "select_numba_target"]


def gpu_present() -> bool:
    """True when the CUDA driver loads and reports at least one device (imports no Numba)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return libcuda.cuInit(0) == 0 and libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def select_numba_target() -> bool:
    """Set ``NUMBA_ENABLE_CUDASIM`` (unless already set) to use the GPU if present, else the simulator.

    Call it before anything imports ``numba``. An explicit ``NUMBA_ENABLE_CUDASIM`` wins.

    Returns:
        True when Numba will run on a real GPU.
    """
    if "NUMBA_ENABLE_CUDASIM" not in os.environ:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if gpu_present() else "1"
    return os.environ["NUMBA_ENABLE_CUDASIM"] == "0"
