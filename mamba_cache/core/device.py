"""Device plumbing every Numba module shares: the target, its array class, pointers, the launch factory.

The foundation floor of the package's device code: it imports Numba and ``.launch`` only, so
kernel modules (``core.kernels``, ``precision``, ``replay``, ``models``) and the backend can all
import it without importing each other. ``mamba_cache.select_numba_target`` must run before it
(``mamba_cache/__init__.py`` does).
"""

from __future__ import annotations

from typing import Any

from numba.cuda.core import config as numba_config

from .launch import DispatcherLaunch, make_launch

__all__ = ["SIMULATOR", "DeviceArray", "Launch", "device_pointer"]

#: True when Numba runs kernels in its CPU simulator (``NUMBA_ENABLE_CUDASIM=1``).
SIMULATOR = bool(numba_config.ENABLE_CUDASIM)

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as DeviceArray

    #: Builds a launch: the dispatcher call under the simulator (there is no driver).
    Launch = DispatcherLaunch
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as DeviceArray

    #: Builds a launch: a checked ``PreparedLaunch``, or ``DispatcherLaunch`` if the check fails.
    Launch = make_launch


def device_pointer(array: Any) -> int:
    """The device address of a Numba device array (0 under the simulator, which has none)."""
    return 0 if SIMULATOR else int(array.device_ctypes_pointer.value or 0)
