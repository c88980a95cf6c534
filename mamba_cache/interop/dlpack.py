"""DLPack in both directions, in ``ctypes``: export a memory range as a capsule, import a capsule.

Why our own producer: Numba's ``DeviceNDArray`` has no ``__dlpack__`` (numba-cuda 0.30.4 consumes
DLPack but does not produce it); ``__cuda_array_interface__`` has no bfloat16 typestring; NumPy
refuses to export its ``ml_dtypes`` bfloat16 arrays; and the maintained producer in our
dependencies, cuda.core's ``StridedMemoryView``, queries the CUDA driver as soon as it wraps a
pointer, so it cannot run (nor be tested) on a machine without a GPU. The structures below are
the ``dlpack.h`` ABI (v1.1), small enough to check field by field.

Export (``to_capsule``): a ``DLManagedTensor`` (capsule name ``"dltensor"``) or, when the consumer
asks for ``max_version >= (1, 0)``, a ``DLManagedTensorVersioned`` (``"dltensor_versioned"``). The
capsule is NumPy's export of an array that only describes the memory, with the device and dtype
fields then rewritten: its deleter and capsule destructor are C code, which matters because a
consumer may call them from another thread or while an exception is pending, where a ``ctypes``
callback would lose the exception. A reference to ``owner`` (the object whose lifetime keeps the
memory valid) is held until the consumer calls the deleter; an unconsumed capsule lets go when
it is garbage-collected.

Import (``from_dlpack``): read a producer's capsule into a `DLPackView` (pointer, shape,
byte strides, dtype, device), which holds the managed tensor until it is dropped and then calls
the producer's deleter.

Layout glossary: ``shape`` and ``strides`` of a DLTensor are int64 arrays; strides count
ELEMENTS (NULL means C-contiguous); ``byte_offset`` is added to ``data``.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, NamedTuple

import numpy as np

#: DLDeviceType codes used here.
KDL_CPU = 1
KDL_CUDA = 2
KDL_CUDA_HOST = 3
KDL_CUDA_MANAGED = 13

#: DLDataTypeCode codes.
KDL_INT = 0
KDL_UINT = 1
KDL_FLOAT = 2
KDL_BFLOAT = 4
KDL_BOOL = 6
KDL_FLOAT8_E4M3FN = 10
KDL_FLOAT8_E5M2 = 12
#: The ``ml_dtypes`` types with a DLPack code of their own, by NumPy name: NumPy describes them as
#: unsigned raw bits of their size, and the code is written into the tensor afterwards.
RAW_CODES = {"bfloat16": KDL_BFLOAT, "float8_e4m3fn": KDL_FLOAT8_E4M3FN, "float8_e5m2": KDL_FLOAT8_E5M2}

#: The DLPack version this producer writes into versioned capsules.
DLPACK_VERSION = (1, 1)
#: DLManagedTensorVersioned.flags bits.
FLAG_READ_ONLY = 1
FLAG_IS_COPIED = 2


class DLDevice(ctypes.Structure):
    """``DLDevice``: device type code and ordinal."""

    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    """``DLDataType``: type code, bits per lane, lanes."""

    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    """``DLTensor``: a strided view of memory (strides in elements; NULL = C-contiguous)."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    """``DLManagedTensor`` (the unversioned ``"dltensor"`` capsule)."""


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    """``DLPackVersion``: major, minor."""

    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    """``DLManagedTensorVersioned`` (the ``"dltensor_versioned"`` capsule, DLPack >= 1.0)."""

    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_api = ctypes.pythonapi
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_SetName.restype = ctypes.c_int
_api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]

_NAMES = {False: b"dltensor", True: b"dltensor_versioned"}
_USED = {False: b"used_dltensor", True: b"used_dltensor_versioned"}

# The carriers of exported tensors no consumer has deleted yet (see to_capsule).
_CARRIERS: weakref.WeakSet = weakref.WeakSet()


class _Carrier:
    """What NumPy wraps: an ``__array_interface__`` of the exported memory, holding its owner."""

    __slots__ = ("__array_interface__", "owner", "__weakref__")

    def __init__(self, data: int, shape: tuple, strides: tuple | None, dtype: np.dtype, owner: Any) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "version": 3,
            "data": (data, False),
            "shape": shape,
            "typestr": dtype.str,
            "strides": strides,
        }


def dl_dtype(dtype: Any) -> tuple[int, int, int]:
    """``(code, bits, lanes)`` of a NumPy dtype (``ml_dtypes.bfloat16`` included).

    Raises:
        BufferError: a dtype DLPack cannot describe (structured, strings, objects).
    """
    dtype = np.dtype(dtype)
    bits = dtype.itemsize * 8
    if dtype.name in RAW_CODES:  # bfloat16, float8_e4m3fn, float8_e5m2
        return RAW_CODES[dtype.name], bits, 1
    kind = dtype.kind
    code = {"i": KDL_INT, "u": KDL_UINT, "f": KDL_FLOAT, "b": KDL_BOOL}.get(kind)
    if code is None:
        raise BufferError(f"DLPack cannot describe dtype {dtype}")
    return code, bits, 1


def np_dtype(code: int, bits: int, lanes: int) -> np.dtype:
    """The NumPy dtype of a DLPack ``(code, bits, lanes)`` (bfloat16 via ``ml_dtypes``).

    Raises:
        BufferError: a vector type (``lanes != 1``) or a code this library does not read.
    """
    if lanes != 1:
        raise BufferError(f"DLPack vector types (lanes={lanes}) are not supported")
    raw = {(code_, 16 if name == "bfloat16" else 8): name for name, code_ in RAW_CODES.items()}
    if (code, bits) in raw:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, raw[code, bits]))
    kind = {KDL_INT: "i", KDL_UINT: "u", KDL_FLOAT: "f", KDL_BOOL: "b"}.get(code)
    if kind is None or bits % 8:
        raise BufferError(f"DLPack dtype code {code} with {bits} bits is not supported")
    return np.dtype("?" if kind == "b" else f"{kind}{bits // 8}")


def to_capsule(
    data: int,
    shape: tuple,
    strides: tuple | None,
    dtype: Any,
    device: tuple[int, int],
    owner: Any,
    *,
    versioned: bool = False,
    read_only: bool = False,
) -> Any:
    """A DLPack capsule describing memory at ``data``, keeping ``owner`` alive until deleted.

    The capsule, its deleter and its destructor are NumPy's (C code, safe to call from any thread
    and while an exception is pending, which Python callbacks are not): NumPy exports an array
    that merely describes the memory (it never reads it) and whose base holds ``owner``; this
    function then writes the real device and, for bfloat16, the type code into the tensor.

    Args:
        data: the address of element ``[0, ..., 0]`` (a device pointer for CUDA memory).
        shape: the shape.
        strides: strides in ELEMENTS, or ``None`` for C-contiguous.
        dtype: a NumPy dtype (``ml_dtypes.bfloat16`` and the float8 types give their type codes).
        device: ``(device_type, device_id)``, e.g. ``(KDL_CUDA, 0)``.
        owner: any object; referenced until the consumer calls the deleter.
        versioned: make a ``"dltensor_versioned"`` capsule (DLPack 1.x) instead of ``"dltensor"``
            (needs NumPy >= 2.1; older NumPy gives ``"dltensor"``).
        read_only: export read-only (the versioned capsule's flag; an unversioned capsule cannot
            say so and is refused with ``BufferError``).

    Returns:
        A ``PyCapsule``; pass it to a consumer (``torch.utils.dlpack.from_dlpack`` takes it as
        is, ``__dlpack__`` returns it).
    """
    code, bits, lanes = dl_dtype(dtype)
    # NumPy describes bfloat16 and float8 as their raw bits; the type code is rewritten below.
    carrier_dtype = np.dtype(f"u{bits // 8}") if code in RAW_CODES.values() else np.dtype(dtype)
    itemsize = carrier_dtype.itemsize
    byte_strides = None if strides is None else tuple(int(s) * itemsize for s in strides)
    carrier = _Carrier(int(data or 0), tuple(int(n) for n in shape), byte_strides, carrier_dtype, owner)
    array = np.asarray(carrier)
    if read_only:
        array.flags.writeable = False
    if versioned:
        try:
            capsule = array.__dlpack__(max_version=DLPACK_VERSION)
        except TypeError:  # NumPy < 2.1 knows only the unversioned capsule
            capsule = array.__dlpack__()
    else:
        capsule = array.__dlpack__()
    is_versioned = bool(_api.PyCapsule_IsValid(id(capsule), _NAMES[True]))
    managed_type = DLManagedTensorVersioned if is_versioned else DLManagedTensor
    managed = managed_type.from_address(_api.PyCapsule_GetPointer(capsule, _NAMES[is_versioned]))
    tensor = managed.dl_tensor
    tensor.device = DLDevice(*device)
    tensor.dtype = DLDataType(code, bits, lanes)
    tensor.data = int(data or 0) or None  # NumPy may normalise the pointer of an empty array
    tensor.byte_offset = 0
    _CARRIERS.add(carrier)
    return capsule


def live_exports() -> int:
    """How many exported tensors no consumer has deleted yet (for tests and leak checks)."""
    return len(_CARRIERS)


class DLPackView(NamedTuple):
    """An imported DLPack tensor: where it is and how it is laid out.

    Holding it holds the producer's managed tensor; dropping the last reference calls its deleter.
    """

    pointer: int
    shape: tuple
    strides: tuple | None  # bytes; None: C-contiguous
    dtype: np.dtype
    device: tuple[int, int]
    keeper: Any


class _Keeper:
    """Calls a consumed managed tensor's deleter when garbage-collected."""

    __slots__ = ("address", "deleter")

    def __init__(self, address: int, deleter: Any) -> None:
        self.address, self.deleter = address, deleter

    def __del__(self) -> None:
        if self.deleter:
            self.deleter(self.address)


def consume_capsule(capsule: Any) -> DLPackView:
    """Take ownership of a ``"dltensor"`` or ``"dltensor_versioned"`` capsule (renaming it ``used_*``).

    Raises:
        BufferError: not a DLPack capsule, an unsupported major version, or an unsupported dtype
            (the capsule is then left unconsumed, so its destructor still frees it).
    """
    for versioned in (True, False):
        if _api.PyCapsule_IsValid(id(capsule), _NAMES[versioned]):
            break
    else:
        raise BufferError(f"not an unconsumed DLPack capsule: {capsule!r}")
    address = _api.PyCapsule_GetPointer(capsule, _NAMES[versioned])
    managed = (DLManagedTensorVersioned if versioned else DLManagedTensor).from_address(address)
    if versioned and managed.version.major != 1:
        raise BufferError(f"DLPack major version {managed.version.major} is not supported (1 is)")
    tensor = managed.dl_tensor
    dtype = np_dtype(tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes)
    ndim = tensor.ndim
    shape = tuple(int(tensor.shape[i]) for i in range(ndim))
    strides = None
    if tensor.strides:
        strides = tuple(int(tensor.strides[i]) * dtype.itemsize for i in range(ndim))
    pointer = int(tensor.data or 0) + int(tensor.byte_offset)
    device = (int(tensor.device.device_type), int(tensor.device.device_id))
    _api.PyCapsule_SetName(capsule, _USED[versioned])
    deleter = managed.deleter
    keeper = _Keeper(address, deleter if ctypes.cast(deleter, ctypes.c_void_p).value else None)
    return DLPackView(pointer, shape, strides, dtype, device, keeper)


def from_dlpack(obj: Any, stream: int | None = None) -> DLPackView:
    """Import any object with ``__dlpack__`` (asking for a versioned capsule, else a plain one).

    Args:
        obj: the producer.
        stream: the consumer stream handed to ``__dlpack__`` (CUDA: 1 = the legacy default
            stream, -1 = no synchronisation); ``None`` leaves it to the producer.

    Raises:
        BufferError: the producer's or `consume_capsule`'s.
    """
    kwargs = {} if stream is None else {"stream": stream}
    try:
        capsule = obj.__dlpack__(max_version=DLPACK_VERSION, **kwargs)
    except TypeError:  # a producer older than the DLPack 1.0 keywords
        capsule = obj.__dlpack__(**kwargs)
    return consume_capsule(capsule)


def element_strides(shape: tuple, byte_strides: tuple | None, itemsize: int) -> tuple | None:
    """Byte strides as element strides (``None`` stays ``None``).

    Raises:
        BufferError: a stride that is not a multiple of the item size.
    """
    if byte_strides is None:
        return None
    if any(s % itemsize for s in byte_strides):
        raise BufferError(f"strides {tuple(byte_strides)} are not multiples of the item size {itemsize}")
    return tuple(s // itemsize for s in byte_strides)


def check_export_request(
    device: tuple[int, int], stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None
) -> bool:
    """Check the keywords of a ``__dlpack__`` call on a zero-copy producer; return ``versioned``.

    Raises:
        BufferError: ``copy=True`` (this producer never copies), or ``dl_device`` names another device.
        TypeError: ``stream`` is neither None nor an int.
    """
    if copy:
        raise BufferError("copy=True: the cache's tensors are exported zero-copy only")
    if dl_device is not None and tuple(dl_device) != tuple(device):
        raise BufferError(f"dl_device={tuple(dl_device)} but the tensor lives on {tuple(device)}; no copy is made")
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, (int, np.integer))):
        raise TypeError(f"stream must be None or an int, got {type(stream).__name__}")
    return max_version is not None and tuple(max_version)[0] >= 1
