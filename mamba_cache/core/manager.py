"""Backend-neutral MambaCacheManager: the public interface, argument checks, views and ownership.

A backend subclasses [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase] and binds a few hooks to its
arrays and
streams (``_stream``, ``_zeros``, ``_zero_fill``, ``_capture``, ``_scatter``, ``_scatter_tree``,
``_zero_slot``, ``_write_slot`` and the argument checks ``_int32_array`` and ``_state_array``).
Everything else -- config validation, index and range checks, the reshape reinterpretation,
logging, copy/move/close -- lives here once, so the NumPy reference and the Numba backend cannot
drift apart.

Storage, per state kind, is ONE allocation holding all layers (see ``docs/concepts``):

    recurrent               [L, B, H, D, N]
    conv                    [L, B, C, K]
    intermediate recurrent  [L, B*S*H*D*N]   flat per layer: the verify pass writes it as
    intermediate conv       [L, B*S*C*K]     [active, V, ...] from the start of the layer

Layer tensors handed out are views of these allocations.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, NamedTuple, TypeAlias

import numpy as np

from .._config import Config, format_bytes

logger = logging.getLogger("mamba_cache")

INT32_MAX = 2**31 - 1

# What the backend hooks take and return. The base class never looks inside these; each backend
# fixes them (the names are for the reader: they are ``Any`` to the type checker).
#: A backend array: ``numpy.ndarray`` (NumPy reference), a ``numba.cuda`` ``DeviceNDArray`` (Numba).
Array: TypeAlias = Any
#: A resolved ``stream`` argument, as ``_stream`` returns it: ``None`` (NumPy), a ``StreamRef`` (Numba).
Stream: TypeAlias = Any
#: A checked int32 index argument, as ``_int32_array`` returns it: the host ``numpy.ndarray`` (NumPy),
#: a ``launch.DeviceArg`` (array, device pointer, shape) (Numba).
IndexArg: TypeAlias = Any
#: An array shape.
Shape: TypeAlias = tuple[int, ...]


class StatePools(NamedTuple):
    """The four stacked allocations of a manager (the intermediate ones ``None`` without MTP)."""

    recurrent: Array
    conv: Array
    intermediate_recurrent: Array | None
    intermediate_conv: Array | None


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


def _refuse_unbuilt(config: Config) -> None:
    """Refuse combinations not built yet rather than compute them wrong (a Config may still plan them)."""


class MambaCacheManagerBase:
    """Per-layer Mamba (recurrent + conv) state manager.

    The interface both backends share, documented once here; the NumPy reference,
    [`NumpyMambaCacheManager`][mamba_cache.NumpyMambaCacheManager], defines its exact semantics.

    Not instantiated directly: the backends subclass it.
    """

    #: Short name of the backend, used in logs and reprs.
    backend = "base"

    def __init__(self, config: Config | None = None, stream: Any = None) -> None:
        if config is None:
            config = Config()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a mamba_cache.Config, got {type(config).__name__}")
        self._become_empty()
        if not config.enabled:
            self._config = config
            return
        self._check_config(config)
        _refuse_unbuilt(config)
        stream = self._stream(stream)
        available, where = self._available_bytes()
        if config.total_bytes > available:
            raise MemoryError(
                f"the cache needs {format_bytes(config.total_bytes)} ({config.total_bytes} bytes) but only "
                f"{format_bytes(available)} ({available} bytes) of {where} is available; nothing was allocated"
            )
        layers = config.num_recurrent_layers
        rec_dtype, conv_dtype = config.recurrent_state_dtype, config.conv_state_dtype
        shapes = [
            ((layers, *config.recurrent_state_shape), rec_dtype),
            ((layers, *config.conv_state_shape), conv_dtype),
        ]
        if config.has_intermediate_states:
            slots_steps = config.max_batch_size * config.max_intermediate_seq_len
            shapes += [
                ((layers, slots_steps * config.recurrent_slot_elems), config.intermediate_recurrent_state_dtype),
                ((layers, slots_steps * config.conv_slot_elems), config.intermediate_conv_state_dtype),
            ]
        # Replay mode: one allocation per stash field, [L, B*S*elems] flat per layer (as above).
        stash_fields = config.replay_stash_fields if config.has_replay_stash else {}
        main_pools, stash_steps = len(shapes), config.max_batch_size * config.max_intermediate_seq_len
        for shape, dtype in stash_fields.values():
            shapes.append(((layers, stash_steps * int(np.prod(shape))), dtype))
        pools: list = []
        try:
            for shape, dtype in shapes:
                pools.append(self._zeros(shape, dtype, stream))
        except BaseException:
            pools.clear()  # leave no partial allocation behind
            self._release_partial()
            raise
        self._stash = dict(zip(stash_fields, pools[main_pools:], strict=True))
        pools = pools[:main_pools]
        rec, conv, inter_rec, inter_conv = pools + [None] * (4 - len(pools))
        self._config = config
        self._pools = StatePools(rec, conv, inter_rec, inter_conv)
        self._verify_shape = (config.max_batch_size, config.max_intermediate_seq_len)
        logger.info(
            "MambaCacheManager (%s): %d recurrent layers, %s allocated (%d bytes)",
            self.backend,
            layers,
            format_bytes(config.total_bytes),
            config.total_bytes,
        )

    # ------------------------------------------------------------ backend hooks
    def _check_config(self, config: Config) -> None:
        """Refuse a config the backend cannot serve (raise ``ConfigError``). Default: accept."""

    def _available_bytes(self) -> tuple[int, str]:
        """(bytes the pools may take, what memory that is), checked before allocating."""
        raise NotImplementedError

    def _release_partial(self) -> None:
        """Return memory of pools dropped after a failed allocation. Default: nothing to do."""

    def _stream(self, stream: Any) -> Stream:
        """Turn the user's ``stream`` argument into what the other hooks take."""
        raise NotImplementedError

    def _zeros(self, shape: Shape, dtype: np.dtype, stream: Stream) -> Array:
        """Allocate a zeroed C-contiguous array."""
        raise NotImplementedError

    def _zero_fill(self, pool_a: Array, pool_b: Array, stream: Stream) -> None:
        """Zero two whole stacked pools (the same one twice is allowed)."""
        raise NotImplementedError

    def _capture(self, pool: Array, slot: int, stream: Stream) -> Array:
        """Return a new ``[L, 1, ...]`` array holding slot ``slot`` of every layer of ``pool``."""
        raise NotImplementedError

    def _capture_into(self, pool: Array, slot: int, out: Array, stream: Stream) -> None:
        """Copy slot ``slot`` of every layer of ``pool`` into the checked ``[L, 1, ...]`` ``out``."""
        raise NotImplementedError

    def _capture_pair_into(self, slot: int, outs: tuple[Array, Array], stream: Stream) -> None:
        """Copy slot ``slot`` of both main pools into the checked ``(recurrent, conv)`` ``[L, 1, ...]`` outputs.

        Default: one ``_capture_into`` per kind; the Numba backend copies both in one launch.
        """
        self._capture_into(self._pools.recurrent, slot, outs[0], stream)
        self._capture_into(self._pools.conv, slot, outs[1], stream)

    def _split_layers(self, stacked: Array) -> list[Array]:
        """One view per layer of a stacked ``[L, ...]`` array."""
        return [stacked[layer] for layer in range(stacked.shape[0])]

    def _export(self, array: Array, dtype: np.dtype) -> Array:
        """A view handed to the user, as the class that exports DLPack (``dtype``: the cache's dtype of it).

        Default: ``array`` itself.
        """
        return array

    def _int32_array(self, name: str, array: Any, layout: str, stream: Stream) -> tuple[IndexArg, Shape]:
        """Check an int32 index array argument (kind, device, dtype, rank, contiguity).

        Returns (what the scatter hooks take, its shape); raises before touching any state.
        """
        raise NotImplementedError

    def _scatter(
        self,
        accept: IndexArg,
        indices: IndexArg | None,
        active: int,
        seq_len: int,
        max_accept: int,
        stream: Stream,
        positions: IndexArg | None = None,
    ) -> None:
        """Commit row ``b``'s step ``accept[b] - 1`` when ``1 <= accept[b] <= max_accept``, both kinds.

        The slot is ``indices[b]`` (``b`` when ``indices`` is None), skipped outside ``[0, B)``.
        Pools of other dtypes than their intermediate ones are converted in the same launch
        (``positions``, checked, or None: the stochastic-rounding positions, see ``_positions``).
        """
        raise NotImplementedError

    def _scatter_tree(
        self,
        nodes: IndexArg,
        accept: IndexArg,
        indices: IndexArg | None,
        active: int,
        seq_len: int,
        stream: Stream,
        positions: IndexArg | None = None,
    ) -> None:
        """Row ``b`` commits its last accepted tree node (see ``scatter_accepted_tree_states``)."""
        raise NotImplementedError

    def _zero_slot(self, slot: int, stream: Stream) -> None:
        """Zero slot ``slot`` of every layer of the main recurrent and conv pools."""
        raise NotImplementedError

    def _copy_rows(self, dst: tuple, src: tuple, src_rows: Any, dst_rows: Any, count: int, stream: Any) -> None:
        """``dst[k][:, dst_rows[i]] = src[k][:, src_rows[i]]`` for both kinds ``k`` and ``i < count``, one launch.

        ``dst`` and ``src`` are (recurrent, conv) pairs of stacked ``[L, rows, ...]`` arrays with
        the same per-row layout (the main pools, or a prefix store's entries). The rows are either
        two ints (``count == 1``) or two arrays checked by ``_int32_array``. A pair with either row
        out of range is skipped. The NumPy reference refuses repeated destinations, and
        destinations that are also sources when ``dst is src`` (``ValueError``, nothing changed).
        """
        raise NotImplementedError

    def _host_zeros(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """Zeroed host memory for a prefix store's host tier (page-locked where the backend can)."""
        raise NotImplementedError

    def _entry_to_host(self, src: tuple, entry: int, host: tuple, host_entry: int, stream: Any) -> None:
        """Queue ``host[k][host_entry] = src[k][:, entry]`` (device to host) for both kinds on ``stream``.

        ``src`` are stacked ``[L, rows, ...]`` device pools; ``host`` are ``[P_host, L, ...]`` (one
        host entry dense).
        """
        raise NotImplementedError

    def _host_to_rows(self, host: tuple, host_entry: int, dst: tuple, row: int, stream: Any) -> None:
        """Queue ``dst[k][:, row] = host[k][host_entry]`` (host to device) for both kinds on ``stream``."""
        raise NotImplementedError

    def _new_event(self) -> Any:
        """A fresh event for ordering copies across streams (``None`` where work is synchronous)."""
        raise NotImplementedError

    def _record_event(self, event: Any, stream: Any) -> None:
        """Record ``event`` on ``stream`` (after the work queued so far)."""
        raise NotImplementedError

    def _wait_event(self, event: Any, stream: Any) -> None:
        """Make ``stream`` wait (on the device, no host synchronisation) for ``event``."""
        raise NotImplementedError

    def _scatter_tracked(
        self,
        accept: Any,
        indices: Any,
        active: int,
        seq_len: int,
        max_accept: int,
        store: Any,
        entries: Any,
        steps: Any,
        stream: Any,
        positions: Any = None,
    ) -> None:
        """``_scatter`` fused with checkpoint tracking into a prefix store, in one launch.

        Row ``b``'s state after step ``steps[b]`` goes into store entry ``entries[b]`` when
        ``0 <= steps[b] < accept[b]``, ``steps[b] < seq_len`` and the entry is in range. With mixed
        dtypes both copies convert to the main dtype (a stochastic one keyed by ``positions[b]``
        plus the tokens the copied state consumed).
        """
        raise NotImplementedError

    def _state_array(self, name: str, array: Any, shape: Shape, dtype: np.dtype) -> Array:
        """Check one captured state against a pool slot (kind, device, dtype, shape); return a handle."""
        raise NotImplementedError

    def _write_slot(self, pool: Array, layer: int, slot: int, state: Array, stream: Stream) -> None:
        """Copy one checked ``[1, ...]`` state into ``pool[layer, slot]``."""
        raise NotImplementedError

    def _from_host(self, array: np.ndarray, stream: Stream) -> Array:
        """A host array as the backend's array (a device copy for the Numba backend)."""
        raise NotImplementedError

    def _to_host(self, array: Array, stream: Stream) -> np.ndarray:
        """A backend array as a host array."""
        raise NotImplementedError

    # ------------------------------------------------------------ state
    def _become_empty(self) -> None:
        self._config = Config()
        self._pools: StatePools | None = None
        self._verify_shape = (0, 0)
        self._view_cache: dict = {}
        self._capture_outs: dict = {}
        self._closed = False
        self._stash: dict = {}  # replay mode: stash field name -> [L, B*S*elems] pool

    def _run_on_device(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` with this manager's device current (the Numba backend's override).

        The manager's own public methods do this already; objects built on a manager (the prefix
        store) call their device work through it.
        """
        return function(*args, **kwargs)

    def _check_open(self, what: str) -> None:
        """Raise ``ValueError`` if this manager was closed or moved from (as a closed file does)."""
        if self._closed:
            raise ValueError(
                f"{what}: this manager was closed or moved from and holds no state "
                "(use the manager move() returned, or build a new one)"
            )

    def _require_pools(self, what: str) -> StatePools:
        self._check_open(what)
        if self._pools is None:
            raise IndexError(f"{what}: this manager has no recurrent layers (num_recurrent_layers == 0)")
        return self._pools

    def _layer(self, kind: str, layer: Any) -> Any:
        pools = self._require_pools(f"get_{kind}_state")
        index = check_index("recurrent_layer_idx", layer, self._config.num_recurrent_layers)
        key = (kind, index)
        view = self._view_cache.get(key)
        if view is None:
            view = self._export(getattr(pools, kind)[index], getattr(self._config, f"{kind}_state_dtype"))
            self._view_cache[key] = view
        return view

    def _intermediate_layer(self, kind: str, layer: Any) -> Any:
        pools = self._require_pools(f"get_intermediate_{kind}_state")
        index = check_index("recurrent_layer_idx", layer, self._config.num_recurrent_layers)
        flat = getattr(pools, f"intermediate_{kind}")
        if flat is None and self._config.commit_mode == "replay":
            raise ValueError(
                f"get_intermediate_{kind}_state: commit_mode='replay' keeps no per-step states; "
                "the verify pass writes the replay stash (get_replay_stash) instead"
            )
        if flat is None:
            raise RuntimeError(
                f"get_intermediate_{kind}_state: intermediate states are not allocated "
                "(max_intermediate_seq_len == 0, MTP off)"
            )
        key = (f"intermediate_{kind}", index)
        view = self._view_cache.get(key)
        if view is None:
            active, seq = self._verify_shape
            per_layer = getattr(self._config, f"{kind}_state_shape")[1:]
            elems = int(np.prod(per_layer))
            view = flat[index, : active * seq * elems].reshape((active, seq, *per_layer))
            view = self._export(view, getattr(self._config, f"intermediate_{kind}_state_dtype"))
            self._view_cache[key] = view
        return view

    # ------------------------------------------------------------ queries
    def num_layers(self) -> int:
        """Number of recurrent layers (0 for an empty, closed or moved-from manager)."""
        return self._config.num_recurrent_layers

    def get_config(self) -> Config:
        """The cache configuration (the default, empty one after ``close``/``move``)."""
        return self._config

    def has_intermediate_recurrent_states(self) -> bool:
        """True when the MTP intermediate recurrent buffers are allocated."""
        return self._pools is not None and self._pools.intermediate_recurrent is not None

    def has_intermediate_conv_states(self) -> bool:
        """True when the MTP intermediate conv buffers are allocated."""
        return self._pools is not None and self._pools.intermediate_conv is not None

    @property
    def intermediate_shape(self) -> tuple[int, int]:
        """``(active, V)``: the leading dims of the intermediate views after the latest reshape.

        ``(B, S)`` until the first reshape; ``(0, 0)`` without intermediate buffers.
        """
        return self._verify_shape if self.has_intermediate_recurrent_states() or self._stash else (0, 0)

    def get_recurrent_state(self, recurrent_layer_idx: int) -> Any:
        """The recurrent state of one layer: a view of the pool, ``[B, H, D, N]``, recurrent dtype.

        Writes through the view change the cache.

        Raises:
            IndexError: ``recurrent_layer_idx`` outside ``[0, num_layers())``, or no layers (also
                after ``close()``/``move()``).
            TypeError: ``recurrent_layer_idx`` is not an integer.
        """
        return self._layer("recurrent", recurrent_layer_idx)

    def get_conv_state(self, recurrent_layer_idx: int) -> Any:
        """The conv state of one layer: a view of the pool, ``[B, C, K]``, conv dtype.

        Raises:
            IndexError: ``recurrent_layer_idx`` outside ``[0, num_layers())``, or no layers (also
                after ``close()``/``move()``).
            TypeError: ``recurrent_layer_idx`` is not an integer.
        """
        return self._layer("conv", recurrent_layer_idx)

    def get_intermediate_recurrent_state(self, recurrent_layer_idx: int) -> Any:
        """MTP intermediate recurrent states of one layer, ``[active, V, H, D, N]``, recurrent dtype.

        ``(active, V)`` is ``(B, S)`` until
        [`reshape_intermediate_states`][mamba_cache.MambaCacheManagerBase.reshape_intermediate_states] changes it;
        the view
        always starts at the beginning of the layer's buffer (a reinterpretation, not a slice of
        the full-size view).

        Raises:
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
            RuntimeError: the intermediate buffers are not allocated (``max_intermediate_seq_len == 0``).
            ValueError: ``commit_mode="replay"``: no per-step states exist (see ``get_replay_stash``).
        """
        return self._intermediate_layer("recurrent", recurrent_layer_idx)

    def get_intermediate_conv_state(self, recurrent_layer_idx: int) -> Any:
        """MTP intermediate conv states of one layer, ``[active, V, C, K]``, conv dtype.

        Raises:
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
            RuntimeError: the intermediate buffers are not allocated (``max_intermediate_seq_len == 0``).
            ValueError: ``commit_mode="replay"``: no per-step states exist (see ``get_replay_stash``).
        """
        return self._intermediate_layer("conv", recurrent_layer_idx)

    # ------------------------------------------------------------ operations
    def clear_states(self, stream: Any = None) -> None:
        """Zero every main recurrent and conv buffer (all layers, all slots).

        The intermediate buffers are left as they are (as in the C++). No-op with no layers.

        Args:
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            TypeError: ``stream`` is of an unknown kind (Numba backend).
        """
        self._check_open("clear_states")
        stream = self._stream(stream)
        if self._pools is None:
            return
        self._zero_fill(self._pools.recurrent, self._pools.conv, stream)

    def capture_recurrent_states(self, batch_idx: int, stream: Any = None, *, out: Any = None) -> Any:
        """Copy one slot's recurrent state of every layer into new arrays, or into ``out``.

        Args:
            batch_idx: the slot, in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).
            out: optional ``[L, 1, H, D, N]`` array of the recurrent dtype, C-contiguous, on the
                backend's device (keyword only). The copy goes there: nothing is allocated, so
                the call can be captured in a CUDA graph; reuse one ``out`` across calls.

        Returns:
            Without ``out``: one new array per layer, ``[1, H, D, N]``, recurrent dtype,
            independent of the pool (``[]`` with no layers). With ``out``: ``out`` itself.

        Raises:
            IndexError: ``batch_idx`` outside ``[0, B)``.
            TypeError: ``batch_idx`` is not an integer, ``stream`` is of an unknown kind, or
                ``out`` has another dtype or lives on the wrong device.
            ValueError: ``out`` has another shape or is not contiguous (nothing is copied).
        """
        return self._capture_kind("recurrent", batch_idx, stream, out)

    def capture_conv_states(self, batch_idx: int, stream: Any = None, *, out: Any = None) -> Any:
        """Copy one slot's conv state of every layer into new arrays, or into ``out``.

        Args:
            batch_idx: the slot, in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).
            out: optional ``[L, 1, C, K]`` array of the conv dtype (see
                ``capture_recurrent_states``; keyword only).

        Returns:
            Without ``out``: one new array per layer, ``[1, C, K]``, conv dtype (``[]`` with no
            layers). With ``out``: ``out`` itself.

        Raises:
            IndexError: ``batch_idx`` outside ``[0, B)``.
            TypeError: ``batch_idx`` is not an integer, ``stream`` is of an unknown kind, or
                ``out`` has another dtype or lives on the wrong device.
            ValueError: ``out`` has another shape or is not contiguous.
        """
        return self._capture_kind("conv", batch_idx, stream, out)

    def _capture_kind(self, kind: str, batch_idx: Any, stream: Any, out: Any = None) -> Any:
        self._check_open(f"capture_{kind}_states")
        stream = self._stream(stream)
        if self._pools is None:
            if out is not None:
                raise IndexError(f"capture_{kind}_states: this manager has no recurrent layers, nothing to copy")
            return []
        slot = check_index("batch_idx", batch_idx, self._config.max_batch_size)
        pool = getattr(self._pools, kind)
        if out is None:
            return self._split_layers(self._capture(pool, slot, stream))
        last = self._capture_outs.get(kind)
        if last is not None and last[0] is out:  # an engine reuses one buffer: checked once
            target = last[1]
        else:
            target = self._state_array("out", out, (pool.shape[0], 1, *pool.shape[2:]), pool.dtype)
            self._capture_outs[kind] = (out, target)
        self._capture_into(pool, slot, target, stream)
        return out

    def capture_states(self, batch_idx: int, stream: Any = None, *, out: tuple) -> tuple:
        """Copy one slot's recurrent AND conv states of every layer into caller-provided outputs.

        The engine form of ``capture_recurrent_states`` + ``capture_conv_states``: nothing is
        allocated, nothing synchronises, and on the Numba backend one launch copies both kinds of
        every layer, so the call can be captured in a CUDA graph (make one eager call first: it
        prepares the launch). Reuse one ``out`` pair across calls: it is checked once, and later
        calls with the same two objects only re-launch. The allocating ``capture_*_states``
        stay for the C++ API.

        Args:
            batch_idx: the slot, in ``[0, B)``.
            stream: the stream to copy on (ignored by the NumPy backend).
            out: ``(recurrent_out, conv_out)`` (keyword only): ``[L, 1, H, D, N]`` of the recurrent
                dtype and ``[L, 1, C, K]`` of the conv dtype, C-contiguous, on the backend's device
                (NumPy: host ``numpy.ndarray``; Numba: device arrays, anything with
                ``__cuda_array_interface__``, or anything with ``__dlpack__`` on the manager's GPU;
                a bfloat16 pool takes uint16 raw bits, or a DLPack bfloat16 tensor).

        Returns:
            ``out`` itself, holding slot ``batch_idx`` of every layer once the stream gets there.

        Raises:
            IndexError: ``batch_idx`` outside ``[0, B)``, or the manager has no layers.
            TypeError: ``batch_idx`` is not an integer, ``stream`` is of an unknown kind, ``out``
                is not a pair, or an output has another dtype or lives on the wrong device.
            ValueError: an output has another shape or is not contiguous, or the manager was
                closed or moved from. Both outputs are checked before anything is copied.
        """
        self._check_open("capture_states")
        stream = self._stream(stream)
        if self._pools is None:
            raise IndexError("capture_states: this manager has no recurrent layers, nothing to copy")
        slot = check_index("batch_idx", batch_idx, self._config.max_batch_size)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(
                "out must be a pair (recurrent_out, conv_out) of [L, 1, ...] arrays, got "
                f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, (tuple, list)) else ''}; "
                "nothing was copied"
            )
        last = self._capture_outs.get("both")
        if last is not None and last[0] is out[0] and last[1] is out[1]:  # an engine reuses its pair
            targets = last[2]
        else:
            targets = tuple(
                self._state_array(f"out[{i}]", array, (pool.shape[0], 1, *pool.shape[2:]), pool.dtype)
                for i, (array, pool) in enumerate(zip(out, (self._pools.recurrent, self._pools.conv), strict=True))
            )
            self._capture_outs["both"] = (out[0], out[1], targets)
        self._capture_pair_into(slot, targets, stream)
        return out

    def reshape_intermediate_states(self, active_batch_size: int, seq_len: int) -> None:
        """Reinterpret every intermediate buffer as ``[active_batch_size, seq_len, ...]``.

        The verify pass writes its per-token states contiguously from the start of each layer's
        buffer; afterwards each intermediate tensor is a view of the first
        ``active_batch_size * seq_len * elems`` elements. No data moves. In replay mode the
        stash views (``get_replay_stash``) are reshaped the same way. No-op without
        intermediate buffers or stash.

        Args:
            active_batch_size: in ``[1, B]``.
            seq_len: the verify length V, in ``[1, S]``.

        Raises:
            ValueError: an argument outside its range (nothing changes).
            TypeError: an argument is not an integer.
        """
        self._check_open("reshape_intermediate_states")
        if not self.has_intermediate_recurrent_states() and not self._stash:
            return
        config = self._config
        active = check_size("active_batch_size", active_batch_size, 1, config.max_batch_size)
        seq = check_size("seq_len", seq_len, 1, config.max_intermediate_seq_len)
        if (active, seq) != self._verify_shape:
            self._verify_shape = (active, seq)
            for key in [k for k in self._view_cache if k[0].startswith("intermediate_")]:
                del self._view_cache[key]

    def _max_accept(self, seq_len: int) -> int:
        # The verify pass either left the final state in the main pool (a full accept needs no
        # copy: commit steps 0 .. V-2) or left the pool untouched (commit steps 0 .. V-1).
        return seq_len - 1 if self._config.verify_writes_main_pool else seq_len

    def _accept_and_indices(self, accept_lengths: Any, state_indices: Any, stream: Any) -> tuple:
        """Check ``accept_lengths`` ``[active]`` and the optional ``state_indices`` ``[active]``."""
        accept, (active,) = self._int32_array("accept_lengths", accept_lengths, "[active]", stream)
        view = self._verify_shape[0]
        if active > view:
            # Rows past the current view were not written by this verify pass.
            raise ValueError(
                f"accept_lengths must have length in [0, {view}] (the active batch of the latest "
                f"reshape_intermediate_states; max_batch_size before any), got {active}"
            )
        indices = None
        if state_indices is not None:
            indices, (count,) = self._int32_array("state_indices", state_indices, "[active]", stream)
            if count != active:
                raise ValueError(f"state_indices must have the length of accept_lengths ({active}), got {count}")
        return accept, indices, active

    def _rounds_stochastically(self) -> bool:
        """True when a commit stores a 4- or 8-byte per-step state into a 2-byte pool with stochastic rounding."""
        config = self._config
        if not config.stochastic_rounding:
            return False
        return any(
            getattr(config, f"{kind}_state_dtype").itemsize == 2
            and getattr(config, f"intermediate_{kind}_state_dtype").itemsize >= 4
            for kind in ("recurrent", "conv")
        )

    def _positions(self, positions: Any, active: int, stream: Any) -> Any:
        """Check the optional ``positions`` ``[active]`` int32 argument of a commit (None stays None).

        Raises:
            ValueError: it is missing while the commit rounds stochastically, or has another length.
        """
        if positions is None:
            if self._rounds_stochastically():
                raise ValueError(
                    "positions (int32 [active], tokens each row's main state had consumed before the verify "
                    "pass) is required: this commit rounds stochastically; nothing was changed"
                )
            return None
        checked, (count,) = self._int32_array("positions", positions, "[active]", stream)
        if count != active:
            raise ValueError(f"positions must have the length of accept_lengths ({active}), got {count}")
        return checked

    def scatter_mtp_states(
        self,
        accept_lengths: Any,
        stream: Any = None,
        *,
        state_indices: Any = None,
        positions: Any = None,
        store: Any = None,
        track_entries: Any = None,
        track_steps: Any = None,
    ) -> None:
        """Commit each row's last accepted intermediate state into the main pools.

        For every layer and every row ``b < len(accept_lengths)``, with ``V`` the current second
        dimension of the intermediate views and ``a = accept_lengths[b]``: if ``1 <= a <= V - 1``
        (``1 <= a <= V`` when ``Config.verify_writes_main_pool`` is False) the slot receives
        ``intermediate[b, a - 1]`` of both state kinds; otherwise (padding ``<= 0``, or a full
        accept whose final state the verify pass already left in the pool, or out of range) it is
        untouched. The slot is ``b``, or ``state_indices[b]`` when given; a row whose index is
        outside ``[0, B)`` is skipped. Slots no row commits to are never touched; any int32 value
        is safe. Committing rows must name distinct slots.

        Args:
            accept_lengths: ``[active]`` int32, ``active <= B``: accepted tokens per row (NumPy
                backend: a host ``numpy.ndarray``; Numba backend: on the device, see there).
            stream: the stream to run on (ignored by the NumPy backend).
            state_indices: optional ``[active]`` int32, the pool slot of each row (keyword only).
            positions: optional ``[active]`` int32 (keyword only): tokens row ``b``'s main state had
                consumed before the verify pass, ``p``; the committed state after step ``t`` has
                consumed ``p + t + 1``. Required when ``Config.stochastic_rounding`` is on and a
                float32/float64 per-step state is stored into a 16-bit pool (its rounding bits are
                keyed by that position, never by the slot or the step); ignored otherwise.
            store: a [`mamba_cache.prefix.PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] of this manager whose
                entries receive tracked checkpoints (keyword only; give all three tracking arguments or none).
            track_entries: ``[active]`` int32, the store entry (from ``store.reserve()``) row ``b``
                checkpoints into; any value outside ``[0, P)`` tracks nothing.
            track_steps: ``[active]`` int32, the draft step whose state row ``b`` checkpoints, ``-1``
                for none. In the same launch as the commit, entry ``track_entries[b]`` receives
                ``intermediate[b, t]`` (``t = track_steps[b]``) of both kinds when
                ``0 <= t < accept_lengths[b]`` and ``t < V``, converted to the main dtype as the
                commit converts (a stochastic rounding keyed by position ``positions[b] + t + 1``).

        Raises:
            TypeError: an array is of the wrong kind (a device array for the NumPy backend, a
                list, ...) or not int32; or ``stream`` is of an unknown kind; or ``store`` is not a
                prefix store.
            ValueError: an array is not 1-D or not contiguous, ``accept_lengths`` is longer than the
                active batch of the current view, ``state_indices`` or a tracking array has another
                length, only some tracking arguments are given, ``store`` belongs to another manager,
                the manager was closed or moved from, or (NumPy reference) two committing rows name
                one slot, two tracking rows name one entry, or a tracking row names an entry that is
                not reserved.
        """
        self._check_open("scatter_mtp_states")
        self._refuse_in_replay_mode("scatter_mtp_states")
        stream = self._stream(stream)
        if store is not None or track_entries is not None or track_steps is not None:
            tracking = {"store": store, "track_entries": track_entries, "track_steps": track_steps}
            given = [name for name, value in tracking.items() if value is not None]
            if len(given) != len(tracking):
                raise ValueError(
                    f"scatter_mtp_states: store, track_entries and track_steps go together; got {', '.join(given)} "
                    "only; nothing was changed"
                )
        if not self.has_intermediate_recurrent_states():
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        checked_positions = self._positions(positions, active, stream)
        if store is not None:
            if not hasattr(store, "_check_owner"):
                raise TypeError(f"store must be a mamba_cache.prefix.PrefixStateCache, got {type(store).__name__}")
            store._check_owner(self, "store")
            entries, (count,) = self._int32_array("track_entries", track_entries, "[active]", stream)
            if count != active:
                raise ValueError(f"track_entries must have the length of accept_lengths ({active}), got {count}")
            steps, (count,) = self._int32_array("track_steps", track_steps, "[active]", stream)
            if count != active:
                raise ValueError(f"track_steps must have the length of accept_lengths ({active}), got {count}")
            if active:
                seq_len = self._verify_shape[1]
                max_accept = self._max_accept(seq_len)
                self._scatter_tracked(
                    accept, indices, active, seq_len, max_accept, store, entries, steps, stream, checked_positions
                )
                store._tracked_on(stream)
            return
        if active:
            seq_len = self._verify_shape[1]
            self._scatter(
                accept, indices, active, seq_len, self._max_accept(seq_len), stream, positions=checked_positions
            )

    def scatter_accepted_tree_states(
        self,
        accepted_node_ids: Any,
        accept_lengths: Any,
        state_indices: Any = None,
        stream: Any = None,
        *,
        positions: Any = None,
    ) -> None:
        """Tree verification: commit each row's last accepted node into the main pools.

        The verify pass wrote the state after each of the ``V`` tree nodes into the intermediate
        buffers (``[b, node]`` of the current ``[active, V]`` view). For row ``b``, the committed
        node is the last non-negative id among the first ``min(accept_lengths[b], max_accept_len)``
        entries of ``accepted_node_ids[b]``; a row with none, or whose node is ``>= V``, is skipped,
        as is a row whose ``state_indices[b]`` is outside ``[0, B)``. The node's state is always
        copied: a tree's verify pass cannot leave "the" final state in the main pool. One launch
        covers every layer and both state kinds.

        Args:
            accepted_node_ids: ``[active, max_accept_len]`` int32 node ids in acceptance order.
            accept_lengths: ``[active]`` int32, ``active <= B``.
            state_indices: optional ``[active]`` int32 pool slot of each row (default: row ``b``).
            stream: the stream to run on (ignored by the NumPy backend).
            positions: optional ``[active]`` int32 (keyword only), as in ``scatter_mtp_states``; the
                node at index ``j`` of ``accepted_node_ids[b]`` has consumed ``positions[b] + j + 1``
                tokens.

        Raises:
            TypeError: an array is of the wrong kind or not int32; or ``stream`` is of an unknown kind.
            ValueError: wrong rank, not contiguous, ``accept_lengths`` longer than the view, or the rows of
                ``accepted_node_ids`` / ``state_indices`` differ from ``len(accept_lengths)``.
        """
        self._check_open("scatter_accepted_tree_states")
        self._refuse_in_replay_mode("scatter_accepted_tree_states")
        stream = self._stream(stream)
        if not self.has_intermediate_recurrent_states():
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        nodes, shape = self._int32_array("accepted_node_ids", accepted_node_ids, "[active, max_accept_len]", stream)
        if shape[0] != active:
            raise ValueError(f"accepted_node_ids must have len(accept_lengths) = {active} rows, got {shape[0]}")
        checked_positions = self._positions(positions, active, stream)
        if active and shape[1]:
            self._scatter_tree(
                nodes, accept, indices, active, self._verify_shape[1], stream, positions=checked_positions
            )

    # ------------------------------------------------------------ replay commit
    def _refuse_in_replay_mode(self, what: str) -> None:
        if self._config.commit_mode == "replay":
            raise ValueError(
                f"{what}: this cache has commit_mode='replay' and keeps no per-step states; "
                "commit with replay_mtp_states / replay_accepted_tree_states instead (nothing changed)"
            )

    def has_replay_stash(self) -> bool:
        """True when the replay stash is allocated (``commit_mode='replay'``, layers, ``S > 0``)."""
        return bool(self._stash)

    def get_replay_stash(self, recurrent_layer_idx: int) -> dict:
        """The replay stash of one layer: field name to a ``[active, V, ...]`` view.

        ``(active, V)`` is ``(B, S)`` until
        [`reshape_intermediate_states`][mamba_cache.MambaCacheManagerBase.reshape_intermediate_states] changes it; like
        the intermediate states, each view is the first ``active * V * elems`` elements of the layer's buffer (a
        reinterpretation). Fields (``Config.replay_stash_fields``): Mamba2 ``dA [H]``, ``u [H, D]``, ``B [G, N]``
        float32; Gated DeltaNet ``g [H]``, ``beta [H]``, ``k [G, D]``, ``v [H, N]`` float32; both ``conv [C]`` in the
        conv dtype (the conv input column).

        Raises:
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
            ValueError: the cache is not in replay mode or has no stash (``max_intermediate_seq_len == 0``),
                or it was closed / moved from.
        """
        self._require_pools("get_replay_stash")
        index = check_index("recurrent_layer_idx", recurrent_layer_idx, self._config.num_recurrent_layers)
        if not self._stash:
            raise ValueError(
                "get_replay_stash: no replay stash is allocated (needs commit_mode='replay' and "
                f"max_intermediate_seq_len > 0; got commit_mode={self._config.commit_mode!r}, "
                f"max_intermediate_seq_len={self._config.max_intermediate_seq_len})"
            )
        key = ("intermediate_stash", index)
        views = self._view_cache.get(key)
        if views is None:
            active, seq = self._verify_shape
            views = {}
            for name, (shape, dtype) in self._config.replay_stash_fields.items():
                elems = int(np.prod(shape))
                view = self._stash[name][index, : active * seq * elems].reshape((active, seq, *shape))
                views[name] = self._export(view, dtype)
            self._view_cache[key] = views
        return views

    def replay_mtp_states(
        self,
        accept_lengths: Any,
        stream: Any = None,
        *,
        state_indices: Any = None,
        positions: Any = None,
        store: Any = None,
        track_entries: Any = None,
        track_steps: Any = None,
    ) -> None:
        """Commit each row's accepted drafts by recomputing them from the replay stash.

        For every layer and row ``b < len(accept_lengths)``, ``a = accept_lengths[b]``, ``V`` the
        current verify length: if ``1 <= a <= V`` and the slot (``b``, or ``state_indices[b]``) is
        in ``[0, B)``, the slot's states advance by the stashed steps ``t = 0 .. a - 1`` in order,
        computed in float32 and stored to the state dtype after every step exactly as the
        sequential decode step stores it (Mamba2: ``h = h * dA_t + u_t * B_t``; Gated DeltaNet:
        ``S = S * g_t; pred = S^T k_t; S += k_t (beta_t (v_t - pred))``; the conv window becomes the
        last ``K`` columns of ``window ++ conv_0 .. conv_{a-1}``). A full accept ``a = V`` is
        committed too (the replay-mode verify pass never writes the main pools). Other rows, and
        slots no row names, are untouched; any int32 value is safe. Committing rows must name
        distinct slots. One launch covers every layer and both state kinds on the Numba backend.

        Args:
            accept_lengths: ``[active]`` int32, ``active`` at most the active batch of the current
                view (NumPy backend: a host array; Numba backend: a device array or host array).
            stream: the stream to run on (ignored by the NumPy backend).
            state_indices: optional ``[active]`` int32 pool slot of each row (keyword only).
            positions: optional ``[active]`` int32 (keyword only): tokens row ``b``'s main state had
                consumed before the verify pass, ``p``; the state after step ``t`` has consumed
                ``p + t + 1``. Required when ``Config.stochastic_rounding`` is on and the recurrent
                state is 16-bit (each step's store is keyed by that position); ignored otherwise.
            store: a [`mamba_cache.prefix.PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] of this manager whose
                entries receive tracked checkpoints (keyword only; give all three tracking arguments or none).
            track_entries: ``[active]`` int32, the store entry (from ``store.reserve()``) row ``b``
                checkpoints into; any value outside ``[0, P)`` tracks nothing.
            track_steps: ``[active]`` int32, the step whose state row ``b`` checkpoints, ``-1`` for
                none. In the same launch as the commit, entry ``track_entries[b]`` receives both
                kinds of the row's state after replayed step ``t = track_steps[b]`` (as stored) when
                the row commits and ``0 <= t < accept_lengths[b]``; a row that commits nothing
                tracks nothing.

        Raises:
            ValueError: the cache is not in replay mode (use ``scatter_mtp_states``), an array has
                the wrong rank / length / contiguity, ``positions`` is missing while the commit
                rounds stochastically, only some tracking arguments are given, ``store`` belongs to
                another manager, or (NumPy reference) two committing rows name one slot, two
                tracking rows name one entry or a tracking row names an entry that is not reserved;
                nothing changed.
            TypeError: an array is of the wrong kind or not int32, ``stream`` is of an unknown kind,
                or ``store`` is not a prefix store.
        """
        self._check_open("replay_mtp_states")
        tracking = {"store": store, "track_entries": track_entries, "track_steps": track_steps}
        given = [name for name, value in tracking.items() if value is not None]
        if given and len(given) != len(tracking):
            raise ValueError(
                f"replay_mtp_states: store, track_entries and track_steps go together; got {', '.join(given)} "
                "only; nothing was changed"
            )
        if self._pools is not None and self._config.commit_mode != "replay":
            raise ValueError(
                "replay_mtp_states needs Config.commit_mode='replay' (this cache keeps per-step states: "
                "use scatter_mtp_states); nothing changed"
            )
        stream = self._stream(stream)
        if not self._stash:
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        checked_positions = self._replay_positions("replay_mtp_states", positions, active, stream)
        track = None
        if store is not None:
            if not hasattr(store, "_check_owner"):
                raise TypeError(f"store must be a mamba_cache.prefix.PrefixStateCache, got {type(store).__name__}")
            store._check_owner(self, "store")
            entries, (count,) = self._int32_array("track_entries", track_entries, "[active]", stream)
            if count != active:
                raise ValueError(f"track_entries must have the length of accept_lengths ({active}), got {count}")
            steps, (count,) = self._int32_array("track_steps", track_steps, "[active]", stream)
            if count != active:
                raise ValueError(f"track_steps must have the length of accept_lengths ({active}), got {count}")
            track = (store, entries, steps)
        if active:
            seq_len = self._verify_shape[1]
            self._replay(accept, indices, active, seq_len, stream, positions=checked_positions, track=track)
            if store is not None:
                store._tracked_on(stream)

    def _replay_positions(self, what: str, positions: Any, active: int, stream: Any) -> Any:
        """Check a replay commit's optional ``positions`` (required when a 16-bit state rounds stochastically)."""
        if positions is None:
            if self._config.stochastic_rounding and self._config.recurrent_state_dtype.itemsize == 2:
                raise ValueError(
                    f"{what}: positions (int32 [active], tokens each row's main state had consumed before the "
                    "verify pass) is required: the replay rounds its 16-bit states stochastically; nothing was changed"
                )
            return None
        checked, (count,) = self._int32_array("positions", positions, "[active]", stream)
        if count != active:
            raise ValueError(f"positions must have the length of accept_lengths ({active}), got {count}")
        return checked

    def replay_accepted_tree_states(
        self,
        accepted_node_ids: Any,
        accept_lengths: Any,
        state_indices: Any = None,
        stream: Any = None,
        *,
        positions: Any = None,
    ) -> None:
        """Tree verification in replay mode: replay each row's accepted path of tree nodes into its slot.

        The verify pass wrote each tree node's inputs into the stash (``[b, node]`` of the current ``[active, V]``
        view), each computed from its parent's state. Row ``b`` replays the nodes
        ``accepted_node_ids[b, :min(accept_lengths[b], max_accept_len)]`` in order (its accepted root-to-leaf path, as
        in [`replay_mtp_states`][mamba_cache.MambaCacheManagerBase.replay_mtp_states]); a row with no such node, any of
        them outside ``[0, V)`` (``-1`` included: a path has no holes), or a slot outside ``[0, B)`` is skipped. One
        launch covers every layer and both state kinds.

        Args:
            accepted_node_ids: ``[active, max_accept_len]`` int32 node ids in path order.
            accept_lengths: ``[active]`` int32, ``active`` at most the view's active batch.
            state_indices: optional ``[active]`` int32 pool slot of each row (default: row ``b``).
            stream: the stream to run on (ignored by the NumPy backend).
            positions: optional ``[active]`` int32 (keyword only), as in
                [`replay_mtp_states`][mamba_cache.MambaCacheManagerBase.replay_mtp_states]: the state after the ``t``-th
                node of the path has consumed ``positions[b] + t + 1`` tokens.

        Raises:
            ValueError: not in replay mode, wrong rank / rows / contiguity, ``accept_lengths`` longer
                than the view, ``positions`` missing while the commit rounds stochastically, or
                (NumPy reference) two committing rows naming one slot.
            TypeError: an array is of the wrong kind or not int32; or ``stream`` is of an unknown kind.
        """
        self._check_open("replay_accepted_tree_states")
        if self._pools is not None and self._config.commit_mode != "replay":
            raise ValueError(
                "replay_accepted_tree_states needs Config.commit_mode='replay' (this cache keeps per-step "
                "states: use scatter_accepted_tree_states); nothing changed"
            )
        stream = self._stream(stream)
        if not self._stash:
            return
        accept, indices, active = self._accept_and_indices(accept_lengths, state_indices, stream)
        nodes, shape = self._int32_array("accepted_node_ids", accepted_node_ids, "[active, max_accept_len]", stream)
        if shape[0] != active:
            raise ValueError(f"accepted_node_ids must have len(accept_lengths) = {active} rows, got {shape[0]}")
        checked_positions = self._replay_positions("replay_accepted_tree_states", positions, active, stream)
        if active and shape[1]:
            seq_len = self._verify_shape[1]
            self._replay(accept, indices, active, seq_len, stream, nodes=nodes, positions=checked_positions)

    def _replay(
        self,
        accept: Any,
        indices: Any,
        active: int,
        seq_len: int,
        stream: Any,
        nodes: Any = None,
        positions: Any = None,
        track: Any = None,
    ) -> None:
        """Replay row ``b``'s steps ``0 .. accept[b] - 1`` into its slot when ``1 <= accept[b] <= V``.

        With ``nodes`` (``[active, M]``, a tree): the steps are ``nodes[b, :min(accept[b], M)]``.
        ``positions``: checked ``[active]`` int32 or None (stochastic rounding keys). ``track``:
        ``(store, entries, steps)`` or None (prefix-store checkpoints, in the same launch).
        """
        raise NotImplementedError

    # ------------------------------------------------------------ slots
    def copy_slots(self, src_slots: Any, dst_slots: Any, stream: Any = None) -> None:
        """Copy whole slots: ``main[dst_slots[i]] = main[src_slots[i]]``, every layer, both state kinds.

        All pairs in one launch (no allocation, no synchronisation: graph-capturable when the
        arrays are on the device). A pair with either slot outside ``[0, B)`` is skipped (padding).
        The destinations must be distinct and none may also be a source.

        Args:
            src_slots: ``[n]`` int32 source slots (NumPy backend: a host ``numpy.ndarray``; Numba
                backend: a device array, or a host one that is staged).
            dst_slots: ``[n]`` int32 destination slots, the same length.
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            TypeError: an array is of the wrong kind or not int32; or ``stream`` is of an unknown kind.
            ValueError: an array is not 1-D or not contiguous, the lengths differ, the manager was
                closed or moved from, or (NumPy reference) a destination repeats or is also a source.
        """
        self._check_open("copy_slots")
        stream = self._stream(stream)
        src, (count,) = self._int32_array("src_slots", src_slots, "[n]", stream)
        dst, (dst_count,) = self._int32_array("dst_slots", dst_slots, "[n]", stream)
        if dst_count != count:
            raise ValueError(f"dst_slots must have the length of src_slots ({count}), got {dst_count}")
        if self._pools is None or not count:
            return
        main = (self._pools.recurrent, self._pools.conv)
        self._copy_rows(main, main, src, dst, count, stream)

    def clear_slot(self, slot: int, stream: Any = None) -> None:
        """Zero one slot of every layer's recurrent and conv state (a finished sequence).

        Args:
            slot: in ``[0, B)``.
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            IndexError: ``slot`` outside ``[0, B)``; TypeError: not an integer, or a bad ``stream``.
        """
        self._check_open("clear_slot")
        stream = self._stream(stream)
        if self._pools is None:
            return
        self._zero_slot(check_index("slot", slot, self._config.max_batch_size), stream)

    def restore_slot(self, slot: int, recurrent_states: Any, conv_states: Any, stream: Any = None) -> None:
        """Copy captured states (e.g. a system-prompt snapshot) back into one slot of every layer.

        Args:
            slot: in ``[0, B)``.
            recurrent_states: a list of at most L arrays, ``[1, H, D, N]`` of the recurrent dtype, as
                ``capture_recurrent_states`` returns them (host arrays for NumPy, device arrays for
                Numba). Layers past the end of the list are zero-filled.
            conv_states: likewise, ``[1, C, K]`` of the conv dtype.
            stream: the stream to run on (ignored by the NumPy backend).

        Raises:
            IndexError: ``slot`` outside ``[0, B)``.
            TypeError: a list is not a list/tuple, or an array has the wrong dtype or lives on the
                wrong device for this backend.
            ValueError: a list is longer than the layer count, or an array has the wrong shape.
        """
        stream = self._stream(stream)
        pools = self._require_pools("restore_slot")
        config = self._config
        slot = check_index("slot", slot, config.max_batch_size)
        checked = []
        for name, states, pool in (
            ("recurrent_states", recurrent_states, pools.recurrent),
            ("conv_states", conv_states, pools.conv),
        ):
            if not isinstance(states, (list, tuple)):
                raise TypeError(f"{name} must be a list of per-layer arrays, got {type(states).__name__}")
            if len(states) > config.num_recurrent_layers:
                raise ValueError(
                    f"{name} has {len(states)} arrays but the cache has {config.num_recurrent_layers} layers"
                )
            shape = (1, *pool.shape[2:])
            checked.append(
                (pool, [self._state_array(f"{name}[{i}]", a, shape, pool.dtype) for i, a in enumerate(states)])
            )
        self._zero_slot(slot, stream)  # the layers a short list leaves out
        for pool, states in checked:
            for layer, state in enumerate(states):
                self._write_slot(pool, layer, slot, state, stream)

    def save_slot(self, path: Any, slot: int, stream: Any = None) -> None:
        """Save one slot of every layer, with the config and a checksum, to ``path`` (``.npz``).

        Raises:
            IndexError: ``slot`` outside ``[0, B)``, or no layers.
        """
        from ..snapshot import save_snapshot

        self._require_pools("save_slot")
        slot = check_index("slot", slot, self._config.max_batch_size)
        recurrent = self.capture_recurrent_states(slot, stream=stream)
        conv = self.capture_conv_states(slot, stream=stream)
        resolved = self._stream(stream)
        # a bfloat16 pool is uint16 raw bits on the Numba backend: view the host copies as bfloat16
        rec_dtype, conv_dtype = self._config.recurrent_state_dtype, self._config.conv_state_dtype
        save_snapshot(
            path,
            self._config,
            [self._to_host(a, resolved).view(rec_dtype) for a in recurrent],
            [self._to_host(a, resolved).view(conv_dtype) for a in conv],
        )

    def load_slot(self, path: Any, slot: int, stream: Any = None) -> None:
        """Load a snapshot written by `save_slot` (by either backend) into one slot.

        Raises:
            mamba_cache.snapshot.SnapshotError: the file is corrupted, not a snapshot, or was saved
                from a config with other layer counts, shapes or dtypes (nothing is changed).
            IndexError: ``slot`` outside ``[0, B)``, or no layers.
        """
        from ..snapshot import load_snapshot

        self._require_pools("load_slot")
        check_index("slot", slot, self._config.max_batch_size)
        recurrent, conv = load_snapshot(path, self._config)
        resolved = self._stream(stream)
        self.restore_slot(
            slot,
            [self._from_host(a, resolved) for a in recurrent],
            [self._from_host(a, resolved) for a in conv],
            stream=stream,
        )

    # ------------------------------------------------------------ ownership
    def __copy__(self):
        raise TypeError(f"{type(self).__name__} cannot be copied (the buffers are large); use move()")

    def __deepcopy__(self, memo):
        raise TypeError(f"{type(self).__name__} cannot be copied (the buffers are large); use move()")

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} cannot be pickled")

    def move(self) -> MambaCacheManagerBase:
        """Return a new manager that owns this one's buffers; this one becomes empty.

        Returns:
            A manager of the same backend; views handed out before remain valid.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        self._become_empty()
        self._closed = True
        return new

    def close(self) -> None:
        """Release the buffers; the manager then behaves as an empty one. Idempotent."""
        self._become_empty()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        config = self._config
        if self._pools is None:
            state = "closed" if self._closed else "empty"
            return f"{type(self).__name__}({state})"
        return (
            f"{type(self).__name__}(layers={config.num_recurrent_layers}, "
            f"batch={config.max_batch_size}, mtp={config.max_intermediate_seq_len}, "
            f"{format_bytes(config.total_bytes)})"
        )
