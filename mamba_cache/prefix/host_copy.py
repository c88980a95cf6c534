"""Host-tier copies: one strided 2-D copy per state kind between a device row and a host entry.

On the device a row (a live slot, or a store entry) of a stacked ``[L, rows, ...]`` pool is ``L``
pieces of ``width`` bytes, one layer stride (``pitch = rows * width``) apart. The host tier keeps
its entries as ``[P_host, L, ...]``, so one host entry is ``L * width`` dense bytes. One
``cuMemcpy2DAsync`` per state kind moves a whole entry:

```text
device pool [L, rows, ...]                    host tier [P_host, L, ...]
base + row*width                                host + e*L*width
  |<- width ->|                                 |<- width ->|
  [ layer 0   ] . . . rows*width . . .          [ layer 0   ][ layer 1   ] ... [ layer L-1 ]
  [ layer 1   ] . . .                                (pitch = width: dense)
  ...
  [ layer L-1 ]                                 Height = L rows of the 2-D copy
```

where the per-layer form (the earlier binding) queued ``2 L`` copies through Numba's array
methods, each with tens of microseconds of Python in front of it, so the copy engine idled between
small pieces. A device pitch above the device's ``CU_DEVICE_ATTRIBUTE_MAX_PITCH`` (a pool of more
than ~2 GiB per layer) falls back to ``L`` raw ``cuMemcpy*Async`` calls per kind, same semantics.

Every copy is queued on the caller's stream and neither allocates nor synchronises; the host
memory is page-locked (``cuda.pinned_array``), so the copies are truly asynchronous. Ordering
across streams is the store's business (its events), not this module's.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = ["HostTierCopy", "KindGeometry", "kind_geometry", "memcpy2d_fields"]


class KindGeometry(NamedTuple):
    """The 2-D shape of one row of one state kind: ``height`` pieces of ``width`` bytes, ``pitch`` apart."""

    width: int  #: bytes of one row of one layer (a slot's bytes)
    pitch: int  #: bytes between layers on the device: ``rows * width``
    height: int  #: layers ``L``

    @property
    def entry_bytes(self) -> int:
        """Bytes of one host entry of this kind (dense): ``L * width``."""
        return self.height * self.width


def kind_geometry(device_shape: tuple, itemsize: int) -> KindGeometry:
    """The `KindGeometry` of a stacked device pool ``[L, rows, ...]`` of ``itemsize``-byte elements."""
    width = math.prod(device_shape[2:]) * itemsize
    return KindGeometry(width, device_shape[1] * width, device_shape[0])


def memcpy2d_fields(
    geometry: KindGeometry, device_base: int, row: int, host_base: int, host_entry: int, to_host: bool
) -> dict:
    """The ``CUDA_MEMCPY2D`` fields that copy device row ``row`` to / from host entry ``host_entry``.

    Pointers are byte addresses; the memory types are named ``"device"`` / ``"host"``. Written as a
    plain dict so the index math can be checked without a GPU (tests replay it on byte buffers).
    """
    device = {"MemoryType": "device", "Device": device_base + row * geometry.width, "Pitch": geometry.pitch}
    host = {"MemoryType": "host", "Host": host_base + host_entry * geometry.entry_bytes, "Pitch": geometry.width}
    src, dst = (device, host) if to_host else (host, device)
    fields = {f"src{k}": v for k, v in src.items()} | {f"dst{k}": v for k, v in dst.items()}
    return fields | {"WidthInBytes": geometry.width, "Height": geometry.height}


class _Kind(NamedTuple):
    geometry: KindGeometry
    device_base: int
    host_base: int
    params: Any  # a CUDA_MEMCPY2D, or None for the per-layer fallback


class HostTierCopy:
    """The copies of one (device pools, host pools) pair in one direction, built once and reused.

    Args:
        device: (recurrent, conv) stacked device pools ``[L, rows, ...]`` (Numba device arrays).
        host: (recurrent, conv) page-locked host pools ``[P_host, L, ...]`` of the same dtypes.
        to_host: True for device -> host (an offload), False for host -> device (a host restore).
        max_pitch: the device's largest 2-D copy pitch in bytes.

    The pools are kept referenced, so the pointers stay valid while this object lives.
    """

    def __init__(self, device: tuple, host: tuple, to_host: bool, max_pitch: int) -> None:
        from cuda.bindings import driver

        self._driver = driver
        self._arrays = (device, host)
        self.to_host = to_host
        kinds = []
        for dev, hst in zip(device, host, strict=True):
            geometry = kind_geometry(tuple(dev.shape), dev.dtype.itemsize)
            device_base = int(dev.device_ctypes_pointer.value or 0)
            host_base = int(hst.ctypes.data)
            params = None
            if geometry.pitch <= max_pitch and geometry.width:
                params = driver.CUDA_MEMCPY2D()
                fields = memcpy2d_fields(geometry, device_base, 0, host_base, 0, to_host)
                for name, value in fields.items():
                    if name.endswith("MemoryType"):
                        value = getattr(driver.CUmemorytype, f"CU_MEMORYTYPE_{value.upper()}")
                    setattr(params, name, value)
            kinds.append(_Kind(geometry, device_base, host_base, params))
        self._kinds = tuple(kinds)

    @property
    def copies_per_call(self) -> int:
        """Driver copy calls one `copy` queues (2 when both kinds take the 2-D copy)."""
        return sum(1 if k.params is not None else k.geometry.height for k in self._kinds)

    def copy(self, row: int, host_entry: int, stream_handle: int) -> None:
        """Queue the copy of device row ``row`` <-> host entry ``host_entry`` on ``stream_handle``."""
        driver = self._driver
        for geometry, device_base, host_base, params in self._kinds:
            device = device_base + row * geometry.width
            host = host_base + host_entry * geometry.entry_bytes
            if params is not None:
                if self.to_host:
                    params.srcDevice, params.dstHost = device, host
                else:
                    params.srcHost, params.dstDevice = host, device
                (err,) = driver.cuMemcpy2DAsync(params, stream_handle)
                _check(err, "cuMemcpy2DAsync")
                continue
            for layer in range(geometry.height):  # pitch too large for a 2-D copy
                d, h = device + layer * geometry.pitch, host + layer * geometry.width
                if self.to_host:
                    (err,) = driver.cuMemcpyDtoHAsync(h, d, geometry.width, stream_handle)
                else:
                    (err,) = driver.cuMemcpyHtoDAsync(d, h, geometry.width, stream_handle)
                _check(err, "cuMemcpy*Async")


def max_pitch(ordinal: int) -> int:
    """``CU_DEVICE_ATTRIBUTE_MAX_PITCH`` of GPU ``ordinal``, in bytes."""
    from cuda.bindings import driver

    err, device = driver.cuDeviceGet(ordinal)
    _check(err, "cuDeviceGet")
    err, value = driver.cuDeviceGetAttribute(driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_PITCH, device)
    _check(err, "cuDeviceGetAttribute")
    return int(value)


def _check(err: Any, what: str) -> None:
    from cuda.bindings import driver

    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {err!r}")
