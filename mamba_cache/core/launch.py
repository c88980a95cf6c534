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

The prepared launch relies on Numba internals: the order in which an array argument is marshalled
(`parameter_layout`) and the private ``_prepare_args`` / ``_codelibrary`` of a compiled
kernel. `make_launch` therefore checks, for every launch it builds, that the marshalled block
holds each example argument where that layout says and has as many parameters, of the same sizes,
as the kernel's PTX entry; on any mismatch or error it warns once per kernel and falls back to
`DispatcherLaunch` (correct, slower), so a numba-cuda release that changes the convention
cannot silently launch a kernel with scrambled arguments.
"""

from __future__ import annotations

import ctypes
import inspect
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

from numba import cuda, types

# Numba passes an array argument as: meminfo, parent, nitems, itemsize, data, *shape, *strides.
_ARRAY_NITEMS, _ARRAY_ITEMSIZE, _ARRAY_DATA, _ARRAY_SHAPE = 2, 3, 4, 5
#: The fields of one array argument before its shape and strides, in Numba's marshalling order.
ARRAY_FIELDS = ("meminfo", "parent", "nitems", "itemsize", "data")
_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)


class DeviceArg(NamedTuple):
    """A checked device array argument: the array, its device pointer and its shape.

    ``array`` is what the plain dispatcher launch takes; a prepared launch only needs ``pointer``
    and ``shape``. Built once per call from whatever the user passed (a Numba array, a tensor with
    ``__cuda_array_interface__``, a staged host array).
    """

    array: Any
    pointer: int
    shape: tuple


#: The most threads a copy or converting block launches (tiny slots launch fewer, whole warps).
MAX_THREADS = 256


def slot_launch_shape(units: Sequence[int], per_thread: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """``((chunks, ...), threads)`` of one launch covering one slot of each kind, a kind ``i`` per ``units[i]``.

    A thread does ``per_thread[i]`` work units (words, groups of elements) of kind ``i`` per chunk.
    ``threads`` is the smallest multiple of 32 (at most `MAX_THREADS`) whose chunk covers the
    largest kind's slot, so tiny states do not launch idle warps; ``chunks[i]`` is the number of
    such chunks per slot of kind ``i``. The copy kernels, the converting commits and the element
    path of the precision kernels all size their blocks by this rule.
    """
    needed = max(-(-u // p) for u, p in zip(units, per_thread, strict=True))
    threads = min(MAX_THREADS, max(32, -(-needed // 32) * 32))
    return tuple(-(-u // (threads * p)) for u, p in zip(units, per_thread, strict=True)), threads


def argument_positions(dispatcher: Any) -> dict[str, int]:
    """Each parameter name of a ``@cuda.jit`` kernel mapped to its position in the signature.

    Read from the kernel's own Python signature, so a launch patches arguments by name and a
    kernel whose parameters are reordered cannot silently receive the wrong values.
    """
    return {name: i for i, name in enumerate(inspect.signature(dispatcher.py_func).parameters)}


class LaunchLayoutError(RuntimeError):
    """A kernel's marshalled parameters do not follow the layout `PreparedLaunch` assumes."""


class ArrayFacts(NamedTuple):
    """What an array argument's marshalled fields must hold: element count, item size, pointer, shape, strides."""

    nitems: int
    itemsize: int
    data: int
    shape: tuple
    strides: tuple


def array_facts(array: Any) -> ArrayFacts:
    """The `ArrayFacts` of a device array, read from its ``__cuda_array_interface__``.

    The strides are the array's own ``strides`` where it has them (a Numba array's strides of a
    length-1 axis are what Numba marshals, whatever they are), else those of the interface.
    """
    interface = array.__cuda_array_interface__
    shape = tuple(int(n) for n in interface["shape"])
    itemsize = int(interface["typestr"][2:])
    strides = getattr(array, "strides", None) or interface.get("strides")
    if strides is None:  # C-contiguous
        strides, step = [], itemsize
        for size in reversed(shape):
            strides.insert(0, step)
            step *= size
    return ArrayFacts(math.prod(shape), itemsize, int(interface["data"][0]), shape, tuple(int(s) for s in strides))


def parameter_layout(argument_types: Sequence[Any], names: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """(name, bytes) of every kernel parameter Numba marshals for ``argument_types``, in order.

    An array of rank ``n`` becomes ``5 + 2 n`` pointer-sized parameters: ``meminfo, parent,
    nitems, itemsize, data, shape[0..n), strides[0..n)``; an integer one parameter of its width.
    This is the layout `PreparedLaunch` patches; the PTX ``.param`` list of the compiled
    kernel must agree with it (`ptx_parameter_sizes`).

    Raises:
        LaunchLayoutError: an argument type other than an array or an integer.
    """
    names = list(names) if names is not None else [f"arg{i}" for i in range(len(argument_types))]
    layout: list[tuple[str, int]] = []
    for name, ty in zip(names, argument_types, strict=True):
        if isinstance(ty, types.Array):
            axes = range(ty.ndim)
            fields = [*ARRAY_FIELDS, *(f"shape[{a}]" for a in axes), *(f"strides[{a}]" for a in axes)]
            layout += [(f"{name}.{field}", _POINTER_BYTES) for field in fields]
        elif isinstance(ty, types.Integer):
            layout.append((name, ty.bitwidth // 8))
        else:
            raise LaunchLayoutError(f"{name}: a prepared launch takes arrays and integers only, got {ty}")
    return layout


def ptx_parameter_sizes(ptx: str) -> list[int]:
    """The byte size of each ``.param`` of the first kernel entry (``.entry``) in ``ptx``."""
    start = ptx.index(".entry")
    header = ptx[start : ptx.index(")", start)]
    return [int(bits) // 8 for bits in re.findall(r"\.param\s+\.[a-z]+(\d+)\s", header)]


def check_parameter_block(
    argument_types: Sequence[Any],
    arguments: Sequence[ArrayFacts | int],
    values: Sequence[int],
    offsets: Sequence[int],
    ptx_sizes: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Check that a marshalled parameter block is laid out as `parameter_layout` says.

    Args:
        argument_types: the compiled kernel's Numba argument types.
        arguments: per argument, the `ArrayFacts` of an array or the value of an integer.
        values: the marshalled parameter block, one int per parameter.
        offsets: the index in ``values`` where each argument starts.
        ptx_sizes: the byte sizes of the kernel's PTX ``.param`` list (not checked when ``None``).
        names: the parameter names, for the message.

    Raises:
        LaunchLayoutError: the first difference found (a parameter count or size, or a field that
            does not hold its argument's nitems / itemsize / data pointer / shape / strides).
    """
    layout = parameter_layout(argument_types, names)
    if ptx_sizes is not None:
        sizes = [size for _, size in layout]
        if list(ptx_sizes) != sizes:
            raise LaunchLayoutError(
                f"the kernel's PTX has {len(ptx_sizes)} parameters of sizes {list(ptx_sizes)}; "
                f"the assumed layout has {len(sizes)} of sizes {sizes}"
            )
    if len(values) != len(layout):
        raise LaunchLayoutError(f"Numba marshalled {len(values)} parameters; the assumed layout has {len(layout)}")
    base = 0
    for index, (ty, facts) in enumerate(zip(argument_types, arguments, strict=True)):
        if offsets[index] != base:
            raise LaunchLayoutError(f"argument {index} starts at parameter {offsets[index]}, expected {base}")
        if isinstance(ty, types.Array):
            ndim = ty.ndim
            expected = {
                _ARRAY_NITEMS: facts.nitems,
                _ARRAY_ITEMSIZE: facts.itemsize,
                _ARRAY_DATA: facts.data,
                **{_ARRAY_SHAPE + a: facts.shape[a] for a in range(ndim)},
                # the stride of a length-1 axis is never used, and libraries disagree on it
                **{_ARRAY_SHAPE + ndim + a: facts.strides[a] for a in range(ndim) if facts.shape[a] != 1},
            }
            width = len(ARRAY_FIELDS) + 2 * ndim
        else:
            expected, width = {0: facts}, 1
        for field, value in expected.items():
            if int(values[base + field]) != int(value):
                raise LaunchLayoutError(
                    f"parameter {base + field} ({layout[base + field][0]}) holds {int(values[base + field])}, "
                    f"expected {int(value)}"
                )
        base += width


class DispatcherLaunch:
    """The plain Numba launch, behind the interface of ``PreparedLaunch``."""

    #: ``set_array`` reads ``arg.array`` (a prepared launch only reads its pointer and shape).
    needs_array = True

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

    needs_array = False

    def __init__(self, dispatcher: Any, args: tuple, threads: int, keep_alive: bool = True) -> None:
        from cuda.bindings import driver

        self._driver = driver
        self._cuLaunchKernel = driver.cuLaunchKernel
        self._positions = argument_positions(dispatcher)
        kernel = dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in args))
        values: list = []
        self._offsets = []
        for ty, value in zip(kernel.argument_types, args, strict=True):
            self._offsets.append(len(values))
            kernel._prepare_args(ty, value, 0, [], values)
        # Plain Python ints are pointer-sized in Numba's calling convention.
        self._values = [v if isinstance(v, ctypes._SimpleCData) else ctypes.c_int64(v) for v in values]
        arg_types = kernel.argument_types
        check_parameter_block(
            arg_types,
            [array_facts(a) if isinstance(t, types.Array) else a for t, a in zip(arg_types, args, strict=True)],
            [v.value or 0 for v in self._values],
            self._offsets,
            _ptx_sizes(kernel),
            list(self._positions),
        )
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
        gx, gy, gz = grid  # the launch inlined: this is the hot path of every eager call
        (err,) = self._cuLaunchKernel(
            self._function, gx, gy, gz, self._threads, 1, 1, 0, stream.handle, self._params, 0
        )
        if not err:
            return
        err = int(err)
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

_PTX_SIZES: dict = {}  # compiled kernel -> its PTX parameter sizes (read once per kernel)
_WARNED: set = set()  # kernels that fell back to the dispatcher launch (warned once each)


def _ptx_sizes(kernel: Any) -> list[int]:
    sizes = _PTX_SIZES.get(kernel)
    if sizes is None:
        cc = cuda.get_current_device().compute_capability
        sizes = _PTX_SIZES[kernel] = ptx_parameter_sizes(kernel.inspect_asm(cc))
    return sizes


def numba_cuda_version() -> str:
    """The installed numba-cuda version ("unknown" if its metadata is missing)."""
    from importlib import metadata

    try:
        return metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:
        return "unknown"


def make_launch(
    dispatcher: Any, args: tuple, threads: int, keep_alive: bool = True
) -> PreparedLaunch | DispatcherLaunch:
    """A checked `PreparedLaunch`, or a `DispatcherLaunch` when it cannot be trusted.

    Building the prepared launch checks the marshalled block against `parameter_layout` and
    the kernel's PTX (`check_parameter_block`). On a mismatch, or any error from the Numba
    internals it uses, this warns once per kernel (``RuntimeWarning`` naming the numba-cuda version
    and the kernel) and returns the public dispatcher launch instead: correct, slower.
    """
    try:
        return PreparedLaunch(dispatcher, args, threads, keep_alive)
    except Exception as error:
        name = dispatcher.py_func.__name__
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(
                f"prepared launch of kernel {name} disabled with numba-cuda {numba_cuda_version()} "
                f"({type(error).__name__}: {error}); using the slower dispatcher launch",
                RuntimeWarning,
                stacklevel=2,
            )
        return DispatcherLaunch(dispatcher, args, threads, keep_alive)
