"""Prepared kernel launches: marshal a Numba kernel's arguments once, launch it many times.

A Numba dispatcher call (``kernel[grid, block, stream](*args)``) re-types and re-marshals every
argument on every launch, which costs tens of microseconds of host time -- more than the
scatter itself on a small batch. The state pools never move, so ``PreparedLaunch`` compiles
the kernel for the pools' types once, keeps the marshalled parameter block in ctypes storage,
patches only what changes between calls (the ``accept_lengths`` pointer and length, ``V``) and
hands the block to ``cuLaunchKernel`` from ``cuda.bindings`` (on an H100 host this measured
faster than calling libcuda through ctypes; benchmarks/NOTES.md). The launch neither allocates nor
synchronises, so it can be captured into a CUDA graph.

Under the CUDA simulator there is no driver; ``DispatcherLaunch`` offers the same interface
on top of the ordinary dispatcher call.
"""

from __future__ import annotations

import ctypes
import inspect
import math
from typing import Any, NamedTuple

from numba import cuda

# Numba passes an array argument as: meminfo, parent, nitems, itemsize, data, *shape, *strides.
_ARRAY_NITEMS, _ARRAY_ITEMSIZE, _ARRAY_DATA, _ARRAY_SHAPE = 2, 3, 4, 5


class DeviceArg(NamedTuple):
    """A checked device array argument: the array, its device pointer and its shape.

    ``array`` is what the plain dispatcher launch takes; a prepared launch only needs ``pointer``
    and ``shape``. Built once per call from whatever the user passed (a Numba array, a tensor with
    ``__cuda_array_interface__``, a staged host array).
    """

    array: Any
    pointer: int
    shape: tuple


def argument_positions(dispatcher: Any) -> dict[str, int]:
    """Each parameter name of a ``@cuda.jit`` kernel mapped to its position in the signature.

    Read from the kernel's own Python signature, so a launch patches arguments by name and a
    kernel whose parameters are reordered cannot silently receive the wrong values.
    """
    return {name: i for i, name in enumerate(inspect.signature(dispatcher.py_func).parameters)}


class DispatcherLaunch:
    """The plain Numba launch, behind the interface of ``PreparedLaunch``."""

    def __init__(self, dispatcher: Any, args: tuple, threads: int, keep_alive: bool = True) -> None:
        self._dispatcher = dispatcher
        self._positions = argument_positions(dispatcher)
        self._args = list(args)
        self._threads = threads

    def set_array(self, name: str, arg: DeviceArg, shape_changes: bool = False) -> None:
        """Replace the array argument called ``name`` by ``arg.array``."""
        self._args[self._positions[name]] = arg.array

    def set_scalar(self, name: str, value: int) -> None:
        """Replace the integer argument called ``name``."""
        self._args[self._positions[name]] = value

    def launch(self, grid: tuple, stream: Any) -> None:
        """Launch on ``grid`` blocks of ``threads`` threads on ``stream`` (a ``StreamRef``)."""
        self._dispatcher[grid, self._threads, stream.stream](*self._args)


class PreparedLaunch:
    """One compiled kernel with its parameter block marshalled once (see the module docstring).

    Args:
        dispatcher: a ``@cuda.jit`` kernel.
        args: example arguments that fix the compiled signature and fill the parameter block;
            array arguments must stay alive as long as this object launches with them.
        threads: threads per block.
        keep_alive: hold references to ``args`` (off only where every launch first re-points the
            arrays that would otherwise dangle, with ``set_array``).
    """

    def __init__(self, dispatcher: Any, args: tuple, threads: int, keep_alive: bool = True) -> None:
        from cuda.bindings import driver

        self._driver = driver
        self._positions = argument_positions(dispatcher)
        kernel = dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in args))
        values: list = []
        self._offsets = []
        for ty, value in zip(kernel.argument_types, args, strict=True):
            self._offsets.append(len(values))
            kernel._prepare_args(ty, value, 0, [], values)
        # Plain Python ints are pointer-sized in Numba's calling convention.
        self._values = [v if isinstance(v, ctypes._SimpleCData) else ctypes.c_int64(v) for v in values]
        self._block = (ctypes.c_void_p * len(self._values))(*(ctypes.addressof(v) for v in self._values))
        self._params = ctypes.addressof(self._block)
        self._function = driver.CUfunction(int(kernel._codelibrary.get_cufunc().handle))
        self._threads = threads
        self._bound: dict = {}  # what each patched argument points at now
        self._keep = args if keep_alive else None  # the parameter block points into these arrays

    def set_array(self, name: str, arg: DeviceArg, shape_changes: bool = False) -> None:
        """Point the array argument called ``name`` at ``arg.pointer``.

        With ``shape_changes`` the argument takes ``arg.shape`` (a C-contiguous array of the same
        rank) and its strides too; without, ``arg`` must have the shape and strides of the array it
        replaces. ``arg.array`` itself is not used.
        """
        position = self._positions[name]
        pointer, shape = arg.pointer, (arg.shape if shape_changes else None)
        key = (pointer, shape)
        if self._bound.get(position) == key:  # already points there: a decode loop reuses its arrays
            return
        self._bound[position] = key
        base = self._offsets[position]
        values = self._values
        values[base + _ARRAY_DATA].value = pointer
        if shape is not None:
            ndim = len(shape)
            stride = values[base + _ARRAY_ITEMSIZE].value
            values[base + _ARRAY_NITEMS].value = math.prod(shape)
            for axis in range(ndim - 1, -1, -1):
                values[base + _ARRAY_SHAPE + axis].value = shape[axis]
                values[base + _ARRAY_SHAPE + ndim + axis].value = stride
                stride *= shape[axis]

    def set_scalar(self, name: str, value: int) -> None:
        """Replace the integer argument called ``name``."""
        position = self._positions[name]
        if self._bound.get(position) != value:
            self._bound[position] = value
            self._values[self._offsets[position]].value = value

    def launch(self, grid: tuple, stream: Any) -> None:
        """Launch on ``grid`` blocks of ``threads`` threads on ``stream`` (a ``StreamRef``)."""
        err = self._launch(grid, stream.handle)
        if err == _CUDA_ERROR_INVALID_CONTEXT:
            # A thread that has not used Numba yet has no current context: make it so, retry.
            cuda.current_context()
            err = self._launch(grid, stream.handle)
        if err:
            name = self._driver.cuGetErrorName(self._driver.CUresult(err))[1]
            raise RuntimeError(f"cuLaunchKernel failed: {err} ({name.decode() if name else '?'})")

    def _launch(self, grid: tuple, handle: int) -> int:
        gx, gy, gz = grid
        (err,) = self._driver.cuLaunchKernel(
            self._function, gx, gy, gz, self._threads, 1, 1, 0, handle, self._params, 0
        )
        return int(err)


_CUDA_ERROR_INVALID_CONTEXT = 201
