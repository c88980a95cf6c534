"""The Numba CUDA backend: the reference semantics on device arrays and CUDA streams.

It binds [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase] to ``numba.cuda`` device arrays.
Each state kind is one device allocation holding all layers; the layer tensors are
``DeviceNDArray`` views of it and expose ``__cuda_array_interface__``, so PyTorch
(``torch.as_tensor(view, device="cuda")``) and CuPy (``cupy.asarray(view)``) use them zero-copy.
Numba has no bfloat16 type and ``__cuda_array_interface__`` cannot express one: a bfloat16 pool is
a uint16 device array of the raw bits, and CAI consumers see uint16 (``.view(torch.bfloat16)``).

The kernels are in ``mamba_cache.core.kernels`` (copies, scatters, captures), ``mamba_cache.replay.tiled``
(the replay commit, and checkpoint mode's folds), ``mamba_cache.checkpoint.kernels`` (checkpoint mode's counters,
bound in ``core/numba_checkpoint.py``) and ``mamba_cache.precision`` (converting commits, bound in
``core/numba_convert.py``).
The commits, clears, captures into a caller's buffers and slot copies launch prepared kernels
(``mamba_cache.core.launch``): one launch covering every layer and both state kinds, no allocation,
no host synchronisation, so they can be captured into a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from .._config import Config, ConfigError, format_bytes
from ..replay import tiled as replay_tiled
from . import kernels, numba_convert, numba_quant8
from .device import SIMULATOR, Launch, device_pointer
from .launch import DeviceArg
from .manager import MambaCacheManagerBase
from .numba_args import DeviceArguments
from .numba_checkpoint import CheckpointBinding
from .numba_device import (
    StreamRef,
    aligned_word,
    current_context_handle,
    device_empty,
    device_name,
    on_device,
    resolve_device,
    slot_words,
    stream_ref,
    word_dtype,
)
from .numba_moving import NumbaParcelHooks

__all__ = ["NumbaMambaCacheManager", "device_name"]

#: CUDA limits the y and z grid dimensions (batch rows, layers) to 65535.
MAX_GRID_YZ = 65535


class NumbaMambaCacheManager(DeviceArguments, CheckpointBinding, NumbaParcelHooks, MambaCacheManagerBase):
    """Per-layer Mamba (recurrent + conv) state manager on a CUDA device, through Numba.

    Same interface, semantics and results (bit for bit) as
    [`NumpyMambaCacheManager`][mamba_cache.NumpyMambaCacheManager]; the
    state tensors are ``numba.cuda`` device arrays (views of one allocation per state kind).

    Streams: every ``stream`` argument takes ``None`` (Numba's default stream), a
    ``numba.cuda`` stream, a raw ``CUstream`` handle as an int, or any object with
    ``__cuda_stream__`` (cuda.core, recent PyTorch) or a ``cuda_stream`` attribute
    (``torch.cuda.Stream``). Work is queued on it asynchronously; synchronise the stream before
    reading results on the host.

    Devices: the manager lives on one GPU, ``device`` (an ordinal, or anything with an
    ``index`` such as a ``torch.device``; default: the current torch device when PyTorch is
    initialised, else the current CUDA context's device). Every operation makes that device's
    context current for the call when another is current (another thread, another GPU's work in
    between) and restores it after; when it is already current the check costs a driver query.

    Args:
        config: the cache configuration; ``None`` builds an empty manager.
        stream: the stream on which the buffers are zeroed.
        device: the GPU the pools live on (keyword only), see above.
        replay_kernels: what builds the replay commit's launch (keyword only): a function with the
            signature of `mamba_cache.replay.tiled.prepare` (the default, the kernels the benchmarks
            time). For checking kernels against each other: the tests pass their one-element-per-thread
            oracle here.

    Raises:
        TypeError: ``config`` is not a [`Config`][mamba_cache.Config], or ``stream`` is of an
            unknown kind.
        ConfigError: ``max_batch_size`` or ``num_recurrent_layers`` exceeds 65535 (a CUDA grid
            dimension).
        MemoryError: the device has too little free memory (the message gives the bytes asked for
            and free); checked before allocating, and nothing stays allocated.
    """

    backend = "numba"

    def __init__(
        self, config: Config | None = None, stream: Any = None, *, device: Any = None, replay_kernels: Any = None
    ) -> None:
        self._streams: dict[int, Any] = {}
        self._replay_prepare = replay_tiled.prepare if replay_kernels is None else replay_kernels
        self._gpu, self._context_handle = resolve_device(device)
        if self._gpu is None:
            super().__init__(config, stream)
            return
        with self._gpu:
            super().__init__(config, stream)

    @property
    def device_id(self) -> int:
        """The ordinal of the GPU this manager's pools live on (0 under the simulator)."""
        return 0 if self._gpu is None else self._gpu.id

    def _become_empty(self) -> None:
        super()._become_empty()
        self._launches: dict = {}
        self._staging: dict = {}
        self._placeholder_array = None
        self._last_arrays: dict = {}
        self._converting: tuple | None = None
        self._quant8_placeholder: dict | None = None  # 8-bit commits: stand-ins for absent scale pools

    def _check_config(self, config: Config) -> None:
        for name in ("num_recurrent_layers", "max_batch_size"):
            value = getattr(config, name)
            if value > MAX_GRID_YZ:
                raise ConfigError(f"{name} must be <= {MAX_GRID_YZ} for the Numba backend, got {value}")
        numba_quant8.check_config(config)
        replays = config.has_replay_stash or config.has_history
        if replays and config.mixer == "gdn" and config.recurrent_state_head_dim > 256:
            # a column of the state is split over at most MAX_KEY_DIM / 32 threads (mamba_cache.replay.tiled)
            raise ConfigError(
                "recurrent_state_head_dim (the Gated DeltaNet key dim) must be <= 256 for the Numba replay "
                f"commit and checkpoint fold, got {config.recurrent_state_head_dim}"
            )

    def _run_on_device(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        handle = self._context_handle
        if handle is None or current_context_handle() == handle:
            return function(*args, **kwargs)
        with self._gpu:
            return function(*args, **kwargs)

    # ------------------------------------------------------------ streams
    def _stream(self, stream: Any) -> StreamRef:
        # Engines pass a new object each call (torch.cuda.current_stream(), s.cuda_stream), so the
        # cache is keyed by the raw CUstream handle, read as cheaply as the kind allows; a Numba
        # stream (long-lived, and the only kind the simulator has) is keyed by identity.
        if stream is None:
            ref = self._streams.get(None)
            if ref is None:
                ref = self._streams[None] = stream_ref(cuda.default_stream())
            return ref
        kind = type(stream)
        if kind is StreamRef:  # already resolved (a commit passing its stream on)
            return stream
        if kind is int:
            handle = stream
        elif SIMULATOR or hasattr(stream, "auto_synchronize"):  # a numba.cuda stream
            ref = self._streams.get(("numba", id(stream)))
            if ref is None or ref.owner is not stream:
                ref = self._remember(("numba", id(stream)), stream_ref(stream))
            return ref
        elif hasattr(stream, "cuda_stream"):  # torch.cuda.Stream (also has __cuda_stream__)
            handle = int(stream.cuda_stream)
        elif hasattr(stream, "__cuda_stream__"):  # cuda.core and the CUDA stream protocol
            handle = int(stream.__cuda_stream__()[1])
        elif isinstance(stream, (int, np.integer)) and not isinstance(stream, (bool, np.bool_)):
            handle = int(stream)
        else:
            raise TypeError(
                "stream must be None, a numba.cuda stream, an int CUstream handle or an object with "
                f"__cuda_stream__ / cuda_stream, got {kind.__name__}"
            )
        ref = self._streams.get(handle)
        if ref is None:
            numba_stream = cuda.default_stream() if handle == 0 else cuda.external_stream(handle)
            ref = self._remember(handle, StreamRef(numba_stream, handle, None))
        return ref

    def _remember(self, key: Any, ref: StreamRef) -> StreamRef:
        if len(self._streams) > 64:  # a long-lived manager fed many short-lived streams
            self._streams.clear()
        self._streams[key] = ref
        return ref

    # ------------------------------------------------------------ hooks
    def _available_bytes(self) -> tuple[int, str]:
        if SIMULATOR:
            return 2**63 - 1, "simulated device memory"
        free, _ = cuda.current_context().get_memory_info()
        return int(free), f"free device memory on {device_name()}"

    def _release_partial(self) -> None:
        if not SIMULATOR:
            # Numba defers frees; return the dropped pools' memory now
            cuda.current_context().deallocations.clear()

    def _zeros(self, shape: tuple, dtype: np.dtype, stream: Any) -> Any:
        if dtype.name == "bfloat16":  # Numba has no bfloat16: keep the raw bits (see mamba_cache.precision)
            dtype = np.dtype(np.uint16)
        elif dtype.name.startswith("float8"):  # nor float8: raw bits too
            dtype = np.dtype(np.uint8)
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            array = cuda.device_array(shape, dtype=dtype)  # not bound to a stream: see device_empty
        except Exception as exc:  # numba raises CudaAPIError / its own OOM errors
            if "OUT_OF_MEMORY" not in repr(exc) and "out of memory" not in str(exc).lower():
                raise
            free, total = cuda.current_context().get_memory_info()
            raise MemoryError(
                f"could not allocate {format_bytes(nbytes)} ({nbytes} bytes) of device memory for a "
                f"{list(shape)} {dtype.name} pool; {format_bytes(free)} of {format_bytes(total)} free"
            ) from exc
        words = array.reshape(array.size).view(word_dtype(array.nbytes))
        (blocks,), threads = kernels.launch_shape(words.shape[0])
        # blocks_a covers the whole grid, so the second pool argument is never touched
        Launch(kernels.zero_words, (words, words, blocks), threads).launch((blocks, 1, 1), stream)
        return array

    def _zero_launch(self, pool_a: Any, pool_b: Any) -> tuple:
        """(prepared launch, grid) zeroing the whole of two pools as flat words, in one launch."""
        key = ("zero", id(pool_a), id(pool_b))
        entry = self._launches.get(key)
        if entry is None:
            words = [p.reshape(p.size).view(word_dtype(p.nbytes)) for p in (pool_a, pool_b)]
            (blocks_a, blocks_b), threads = kernels.launch_shape(words[0].shape[0], words[1].shape[0])
            entry = (Launch(kernels.zero_words, (*words, blocks_a), threads), (blocks_a + blocks_b, 1, 1))
            self._launches[key] = entry
        return entry

    def _zero_fill(self, pool_a: Any, pool_b: Any, stream: Any) -> None:
        launch, grid = self._zero_launch(pool_a, pool_b)
        launch.launch(grid, stream)

    def _empty(self, shape: tuple, dtype: np.dtype, stream: Any) -> Any:
        """An uninitialised device array from the stream-ordered allocator (`device_empty`)."""
        return device_empty(shape, dtype, stream)

    def _capture(self, pool: Any, slot: int, stream: Any) -> Any:
        out = device_empty((pool.shape[0], 1, *pool.shape[2:]), pool.dtype, stream)
        self._capture_into(pool, slot, out, stream)
        return self._export(out, self._pool_dtype(pool))

    def _export(self, array: Any, dtype: np.dtype) -> Any:
        # Numba arrays that also export DLPack (bfloat16 pools with the bfloat16 type code)
        from ..interop.arrays import numba_export

        return numba_export(array, dtype, SIMULATOR)

    def _capture_into(self, pool: Any, slot: int, out: Any, stream: Any) -> None:
        layers = pool.shape[0]
        pointer = device_pointer(out)  # read once: it sets the word width and the argument
        word = aligned_word(out, pointer)
        key = ("capture", id(pool), word)
        entry = self._launches.get(key)
        if entry is None:
            src, dst = slot_words(pool, pool.shape[1], word), slot_words(out, 1, word)
            (chunks,), threads = kernels.launch_shape(dst.shape[2])
            # The first output only fixes the signature; every launch re-points dst, so the
            # launch need not keep that capture alive (the pool, src, lives with the manager).
            launch = Launch(kernels.copy_slot, (dst, src, 0), threads, keep_alive=False)
            entry = (launch, (chunks, 1, layers))
            self._launches[key] = entry
        launch, grid = entry
        dst = slot_words(out, 1, word) if launch.needs_array else None
        launch.set_array("dst", DeviceArg(dst, pointer, ()))
        launch.set_scalar("slot", slot)
        launch.launch(grid, stream)

    def _capture_pair_into(self, slot: int, outs: tuple, stream: Any) -> None:
        # One copy_rows launch: row `slot` of both pools -> row 0 of the [L, 1, ...] outputs, the
        # recurrent slot's x blocks then the conv slot's, every layer. Prepared once per word width
        # the outputs' alignment allows; a call only re-points the outputs (nothing to do for the
        # pair it saw last) and sets the slot.
        last = self._launches.get("capture_pair")
        if last is None or last[0] is not outs:
            pointers = [device_pointer(o) for o in outs]  # read once: word widths and arguments
            words = tuple(aligned_word(o, p) for o, p in zip(outs, pointers, strict=True))
            key = ("capture_pair", *words)
            prepared = self._launches.get(key)
            if prepared is None:
                pools, slots = self._pools, self._config.max_batch_size
                src = [slot_words(pools.recurrent, slots, words[0]), slot_words(pools.conv, slots, words[1])]
                dst = [slot_words(o, 1, w) for o, w in zip(outs, words, strict=True)]
                (chunks_a, chunks_b), threads = kernels.launch_shape(dst[0].shape[2], dst[1].shape[2])
                placeholder = self._placeholder().array
                args = (dst[0], src[0], dst[1], src[1], chunks_a, placeholder, placeholder, 0, 0, 0)
                # Every call re-points dst_a / dst_b, so the launch need not keep the first outputs alive.
                launch = Launch(kernels.copy_rows, args, threads, keep_alive=False)
                prepared = self._launches[key] = (launch, (chunks_a + chunks_b, 1, pools.recurrent.shape[0]))
            launch = prepared[0]
            views = [slot_words(o, 1, w) if launch.needs_array else None for o, w in zip(outs, words, strict=True)]
            bound = [DeviceArg(v, p, ()) for v, p in zip(views, pointers, strict=True)]
            last = self._launches["capture_pair"] = (outs, prepared, bound)
        _, (launch, grid), bound = last
        launch.set_array("dst_a", bound[0])
        launch.set_array("dst_b", bound[1])
        launch.set_scalar("src_row", slot)
        launch.launch(grid, stream)

    def _split_layers(self, stacked: Any) -> list:
        cls = type(stacked)  # the DLPack-exporting class of the captured stack (see _capture)
        if SIMULATOR:
            return [cls(layer._ary, stream=layer.stream) for layer in super()._split_layers(stacked)]
        # DeviceNDArray.__getitem__ costs tens of microseconds; a layer of a C-contiguous stack is
        # just a byte range of it, so build the views from the memory directly.
        memory, step = stacked.gpu_data, stacked.strides[0]
        shape, strides, dtype = stacked.shape[1:], stacked.strides[1:], stacked.dtype
        return [
            cls(shape, strides, dtype, gpu_data=memory.view(i * step, (i + 1) * step)) for i in range(stacked.shape[0])
        ]

    def _placeholder(self) -> DeviceArg:
        """An int32 ``[B]`` device array standing in for an unused index argument."""
        if self._placeholder_array is None:
            array = cuda.device_array(max(self._config.max_batch_size, 1), dtype=np.int32)
            self._placeholder_array = DeviceArg(array, device_pointer(array), array.shape)
        return self._placeholder_array

    def _commit_words(self) -> tuple[list, int, int, int]:
        """(word views, chunks_a, chunks_b, threads) every commit kernel starts its arguments with.

        The views are ``[recurrent, intermediate recurrent, conv, intermediate conv]`` as
        ``[L, rows, W]`` words; the chunks cover one slot of each kind in one launch.
        """
        pools, slots = self._pools, self._config.max_batch_size
        steps = slots * self._config.max_intermediate_seq_len
        words = []
        for kind in ("recurrent", "conv"):
            words += [
                slot_words(getattr(pools, kind), slots),
                slot_words(getattr(pools, f"intermediate_{kind}"), steps),
            ]
        (chunks_a, chunks_b), threads = kernels.launch_shape(words[0].shape[2], words[2].shape[2])
        return words, chunks_a, chunks_b, threads

    def _commit_launch(self, key: str, kernel: Any) -> tuple:
        """(prepared launch, x blocks, layers) of a commit kernel over both state kinds.

        Its arguments start with the four word views and ``chunks_a``; the index arrays after
        them are bound to the placeholder until a call points them at its own.
        """
        entry = self._launches.get(key)
        if entry is None:
            words, chunks_a, chunks_b, threads = self._commit_words()
            placeholder = self._placeholder().array
            if kernel is kernels.scatter_tree:  # node_ids, accept_lengths, state_indices, use_indices, seq_len
                rest = (placeholder.reshape((placeholder.size, 1)), placeholder, placeholder, 0, 1)
            else:  # accept_lengths, state_indices, use_indices, seq_len, max_accept
                rest = (placeholder, placeholder, 0, 1, 1)
            launch = Launch(kernel, (*words, chunks_a, *rest), threads)
            entry = self._launches[key] = (launch, chunks_a + chunks_b, self._config.num_recurrent_layers)
        return entry

    def _scatter(
        self, accept: Any, indices: Any, active: int, seq_len: int, max_accept: int, stream: Any, positions: Any = None
    ) -> None:
        if self._config.quantised_kinds:
            return numba_quant8.commit(self, accept, indices, active, seq_len, max_accept, stream, positions)
        if self._converting_commit():
            return numba_convert.scatter(self, accept, indices, active, seq_len, max_accept, stream, positions)
        launch, blocks, layers = self._commit_launch("scatter", kernels.scatter_accepted)
        launch.set_array("accept_lengths", accept, shape_changes=True)
        self._set_indices(launch, indices)
        launch.set_scalar("seq_len", seq_len)
        launch.set_scalar("max_accept", max_accept)
        launch.launch((blocks, active, layers), stream)

    def _scatter_tree(
        self, nodes: Any, accept: Any, indices: Any, active: int, seq_len: int, stream: Any, positions: Any = None
    ) -> None:
        if self._config.quantised_kinds:
            return numba_quant8.commit(self, accept, indices, active, seq_len, seq_len, stream, positions, nodes)
        if self._converting_commit():
            return numba_convert.scatter_tree(self, nodes, accept, indices, active, seq_len, stream, positions)
        launch, blocks, layers = self._commit_launch("tree", kernels.scatter_tree)
        launch.set_array("node_ids", nodes, shape_changes=True)
        launch.set_array("accept_lengths", accept, shape_changes=True)
        self._set_indices(launch, indices)
        launch.set_scalar("seq_len", seq_len)
        launch.launch((blocks, active, layers), stream)

    def _converting_commit(self) -> bool:
        """True when a main pool's dtype differs from its per-step pool's (mamba_cache.precision converts)."""
        converting = self._converting
        if converting is None or converting[0] is not self._config:  # asked on every commit: answer once
            config = self._config
            converting = self._converting = (
                config,
                any(
                    getattr(config, f"{kind}_state_dtype") != getattr(config, f"intermediate_{kind}_state_dtype")
                    for kind in ("recurrent", "conv")
                ),
            )
        return converting[1]

    def _set_indices(self, launch: Any, indices: DeviceArg | None) -> None:
        """Point ``state_indices`` at ``indices`` with ``use_indices`` on, or at the placeholder with it off."""
        launch.set_array("state_indices", self._placeholder() if indices is None else indices, shape_changes=True)
        launch.set_scalar("use_indices", int(indices is not None))

    def _copy_rows(self, dst: tuple, src: tuple, src_rows: Any, dst_rows: Any, count: int, stream: Any) -> None:
        key = ("copy_rows", *(id(pool) for pool in (*dst, *src)))
        entry = self._launches.get(key)
        if entry is None:
            words = []
            for to, frm in zip(dst, src, strict=True):
                words += [slot_words(to, to.shape[1]), slot_words(frm, frm.shape[1])]
            chunks, threads = kernels.launch_shape(*(w.shape[2] for w in words[::2]))
            placeholder = self._placeholder().array
            rows = (placeholder, placeholder, 0, 0, 0)
            if len(dst) == 2:  # the state kinds alone
                kernel, args, blocks = kernels.copy_rows, (*words, chunks[0], *rows), sum(chunks)
            else:  # an 8-bit cache's scales and residual move in the same launch
                ends, blocks = kernels.scaled_ends(chunks)
                padded = words + words[-2:] * (kernels.SCALED_POOLS - len(dst))  # absent pools: no blocks
                kernel, args = kernels.copy_rows_scaled, (*padded, *ends, *rows)
            # keep_alive holds the pools (so the ids in the key cannot be reused while it lives)
            entry = self._launches[key] = (Launch(kernel, args, threads), blocks, self._config.num_recurrent_layers)
        launch, blocks, layers = entry
        if isinstance(src_rows, DeviceArg):
            launch.set_array("src_rows", src_rows, shape_changes=True)
            launch.set_array("dst_rows", dst_rows, shape_changes=True)
            launch.set_scalar("use_rows", 1)
        else:
            launch.set_scalar("use_rows", 0)
            launch.set_scalar("src_row", int(src_rows))
            launch.set_scalar("dst_row", int(dst_rows))
        launch.launch((blocks, count, layers), stream)

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
        if self._config.quantised_kinds:  # the entries first: they read the slots' windows before the commit
            track = (store.entry_pools, entries, steps)
            numba_quant8.commit(self, accept, indices, active, seq_len, max_accept, stream, positions, track=track)
            return numba_quant8.commit(self, accept, indices, active, seq_len, max_accept, stream, positions)
        if self._converting_commit():
            return numba_convert.scatter_tracked(
                self, accept, indices, active, seq_len, max_accept, store, entries, steps, stream, positions
            )
        track_a, track_b = store.entry_pools
        key = ("scatter_tracked", id(track_a))
        entry = self._launches.get(key)
        if entry is None:
            words, chunks_a, chunks_b, threads = self._commit_words()
            tracks = [slot_words(track, track.shape[1]) for track in (track_a, track_b)]
            placeholder = self._placeholder().array
            args = (*words, chunks_a, placeholder, placeholder, 0, 1, 1, *tracks, placeholder, placeholder)
            launch = Launch(kernels.scatter_tracked, args, threads)
            entry = self._launches[key] = (launch, chunks_a + chunks_b, self._config.num_recurrent_layers)
        launch, blocks, layers = entry
        launch.set_array("accept_lengths", accept, shape_changes=True)
        self._set_indices(launch, indices)
        launch.set_array("track_entries", entries, shape_changes=True)
        launch.set_array("track_steps", steps, shape_changes=True)
        launch.set_scalar("seq_len", seq_len)
        launch.set_scalar("max_accept", max_accept)
        launch.launch((blocks, active, layers), stream)

    def _host_zeros(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        array = cuda.pinned_array(shape, dtype=dtype)  # page-locked: the copies are truly asynchronous
        array[...] = 0
        return array

    def _entry_to_host(self, src: tuple, entry: int, host: tuple, host_entry: int, stream: Any) -> None:
        # One strided 2-D copy per kind (mamba_cache.prefix.host_copy); the simulator copies per layer.
        if SIMULATOR:
            for to, frm in zip(host, src, strict=True):
                for layer in range(frm.shape[0]):
                    frm[layer, entry].copy_to_host(to[host_entry, layer], stream=stream.stream)
            return
        self._host_tier_copy(src, host, True).copy(entry, host_entry, stream.handle)

    def _host_to_rows(self, host: tuple, host_entry: int, dst: tuple, row: int, stream: Any) -> None:
        if SIMULATOR:
            for to, frm in zip(dst, host, strict=True):
                for layer in range(to.shape[0]):
                    to[layer, row].copy_to_device(frm[host_entry, layer], stream=stream.stream)
            return
        self._host_tier_copy(dst, host, False).copy(row, host_entry, stream.handle)

    def _host_tier_copy(self, device: tuple, host: tuple, to_host: bool) -> Any:
        """The cached 2-D copies between ``device`` rows and ``host`` entries (a store drops them on close)."""
        key = ("host_copy", id(device[0]), id(host[0]), to_host)
        copy = self._launches.get(key)
        if copy is None:
            from ..prefix import host_copy

            copy = self._launches[key] = host_copy.HostTierCopy(
                device, host, to_host, host_copy.max_pitch(self.device_id)
            )
        return copy

    def _forget(self, arrays: tuple, staging_name: str | None = None) -> None:
        ids = {id(array) for array in arrays}
        for key in [k for k in self._launches if isinstance(k, tuple) and ids.intersection(k)]:
            del self._launches[key]
        for key in [k for k in self._staging if k == staging_name or (isinstance(k, tuple) and staging_name in k)]:
            del self._staging[key]

    def _new_event(self) -> Any:
        return cuda.event() if SIMULATOR else cuda.event(timing=False)  # no timing: a lighter event

    def _record_event(self, event: Any, stream: Any) -> None:
        event.record(stream.stream)

    def _wait_event(self, event: Any, stream: Any) -> None:
        event.wait(stream.stream)

    def _zero_slot(self, slot: int, stream: Any) -> None:
        pools = self._moving_pools()  # with an 8-bit cache's scales and residual, in the same launch
        key = ("zero_slot", *(id(pool) for pool in pools))
        entry = self._launches.get(key)
        if entry is None:
            words = [slot_words(pool, self._config.max_batch_size) for pool in pools]
            chunks, threads = kernels.launch_shape(*(w.shape[2] for w in words))
            if len(words) == 2:
                launch, blocks = Launch(kernels.zero_slot, (*words, chunks[0], 0), threads), sum(chunks)
            else:
                ends, blocks = kernels.scaled_ends(chunks)
                padded = words + words[-1:] * (kernels.SCALED_POOLS - len(words))  # absent pools: no blocks
                launch = Launch(kernels.zero_slot_scaled, (*padded, *ends, 0), threads)
            entry = self._launches[key] = (launch, (blocks, 1, self._config.num_recurrent_layers))
        launch, grid = entry
        launch.set_scalar("slot", slot)
        launch.launch(grid, stream)

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
        if self._config.quantised_kinds:  # an 8-bit recurrent state: values and scales, tracked entries too
            tracked = None if track is None else (track[0].entry_pools, *track[1:])
            return numba_quant8.replay(self, accept, indices, active, seq_len, stream, nodes, positions, track=tracked)
        entry = self._launches.get("replay")
        if entry is None:
            entry = self._launches["replay"] = self._replay_prepare(
                self._pools, self._stash, self._config, self._placeholder().array, Launch
            )
        launch, blocks, layers = entry
        launch.set_array("accept_lengths", accept, shape_changes=True)
        self._set_indices(launch, indices)
        launch.set_scalar("seq_len", seq_len)
        use_nodes = nodes is not None
        if not use_nodes:  # a linear commit never reads node_ids: any [rows, 1] int32 array will do
            placeholder = self._placeholder()
            nodes = DeviceArg(placeholder.array.reshape((placeholder.array.size, 1)), placeholder.pointer, (1, 1))
        launch.set_array("node_ids", nodes, shape_changes=True)
        launch.set_scalar("use_nodes", int(use_nodes))
        launch.set_scalar("use_positions", int(positions is not None))
        if positions is not None:
            launch.set_array("positions", positions, shape_changes=True)
        launch.set_scalar("use_tracking", int(track is not None))
        if track is not None:
            store, entries, steps = track
            self._point_tracking(launch, store.entry_pools, entries, steps)
        launch.launch((blocks, active, layers), stream)

    @staticmethod
    def _point_tracking(launch: Any, targets: tuple, entries: Any, steps: Any) -> None:
        """Point a replay launch's tracking at ``targets`` and the rows' ``entries`` / ``steps``.

        ``targets``: the ``[L, P, ...]`` recurrent and conv stacks, seen flat per entry (host-side views,
        nothing allocated).
        """
        views = []
        for pool in targets:
            flat = pool.reshape(pool.shape[0], pool.shape[1], int(np.prod(pool.shape[2:])))
            views.append(DeviceArg(flat, device_pointer(flat), flat.shape))
        launch.set_array("track_rec", views[0], shape_changes=True)
        launch.set_array("track_conv", views[1], shape_changes=True)
        launch.set_array("track_entries", entries, shape_changes=True)
        launch.set_array("track_steps", steps, shape_changes=True)

    def _write_slot(self, pool: Any, layer: int, slot: int, state: Any, stream: Any) -> None:
        target = pool[layer, slot]
        target.copy_to_device(state.reshape(target.shape), stream=stream.stream)

    def _from_host(self, array: np.ndarray, stream: Any) -> Any:
        if array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):  # the pools hold them as raw bits
            array = array.view(f"u{array.itemsize}")
        return cuda.to_device(np.ascontiguousarray(array), stream=stream.stream)

    def _to_host(self, array: Any, stream: Any) -> np.ndarray:
        host = array.copy_to_host(stream=stream.stream)
        stream.stream.synchronize()
        return host


#: Queries that touch no device memory run as they are; every other public method is wrapped.
_NO_DEVICE = {
    "num_layers",
    "get_config",
    "has_intermediate_recurrent_states",
    "has_intermediate_conv_states",
    "has_replay_stash",
    "intermediate_shape",
    "device_id",
    "move",
    "close",
}
for _name in dir(NumbaMambaCacheManager):
    if not _name.startswith("_") and _name not in _NO_DEVICE:
        _method = getattr(NumbaMambaCacheManager, _name)
        if callable(_method) and not isinstance(_method, type):
            setattr(NumbaMambaCacheManager, _name, on_device(_method))
