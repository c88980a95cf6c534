"""Argument checks the manager, the backends and the prefix store share: each names the argument and the range.

Every check raises before any state is touched, with a message that names the argument, what it
must be and what came in.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

#: The largest int32 value (index arrays are int32).
INT32_MAX = 2**31 - 1

#: The padding row of any int32 array of slots or prefix-store entries: a row naming it reads,
#: writes and tracks nothing, in every call and every commit mode (a CUDA graph's padding rows
#: name it, so they never race on a real slot). Single-slot calls refuse it as out of range.
pad_slot_id = -1


def check_index(name: str, value: Any, stop: int) -> int:
    """Return ``value`` as an int in ``[0, stop)`` or raise ``IndexError``/``TypeError`` naming it."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not 0 <= index < stop:
        raise IndexError(f"{name} must be in [0, {stop}), got {index}")
    return index


def check_size(name: str, value: Any, low: int, high: int) -> int:
    """Return ``value`` as an int in ``[low, high]`` or raise ``ValueError``/``TypeError`` naming it."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not low <= size <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {size}")
    return size


def check_int32_array(name: str, dtype: Any, shape: tuple, contiguous: bool, layout: str) -> tuple:
    """Check the description of an int32 index array argument; return its shape.

    Args:
        name: the argument's name, for the message.
        dtype: its dtype (anything ``numpy.dtype`` accepts; a CUDA array interface typestr too).
        shape: its shape.
        contiguous: whether it is C-contiguous.
        layout: the expected layout, e.g. ``"[active]"``; its rank is the number of commas + 1.

    Raises:
        TypeError: the dtype is not int32.
        ValueError: wrong rank, or not contiguous.
    """
    if np.dtype(dtype) != np.int32:
        raise TypeError(f"{name} must have dtype int32, got {np.dtype(dtype).name}")
    ndim = layout.count(",") + 1
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(shape)}")
    if not contiguous:
        raise ValueError(f"{name} must be contiguous")
    return tuple(int(n) for n in shape)


def is_c_contiguous(shape: tuple, strides: tuple | None, itemsize: int) -> bool:
    """Whether ``strides`` (bytes; ``None`` = C-contiguous) describe a C-contiguous array."""
    if strides is None:
        return True
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True
