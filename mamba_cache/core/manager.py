"""Backend-neutral MambaCacheManager: construction, the layer views, queries and ownership.

The manager is assembled from parts a reader can find by name, each written once for both backends:

- ``core/manager.py`` (here): construction (config checks, one allocation per state kind, logging),
  the layer and intermediate views, the queries, copy / move / close;
- ``core/slots.py``: clear, capture, copy, restore, save and load slots;
- ``core/commits.py``: the verify view (reshape) and the scatter, tree and replay commits;
- ``core/checkpoint.py``: checkpoint mode's ring, counters, commit and folds;
- ``core/moving.py``: state parcels (export / import) and preemption (offload / resume);
- ``core/checks.py``: the argument checks (they name the argument and its range);
- ``core/backend.py``: the hooks a backend binds to its arrays and streams (the declared interface).

So the NumPy reference and the Numba backend cannot drift apart.

Storage, per state kind, is ONE allocation holding all layers (see ``docs/concepts``):

    recurrent               [L, B, H, D, N]
    conv                    [L, B, C, K]
    intermediate recurrent  [L, B*S*H*D*N]   flat per layer: the verify pass writes it as
    intermediate conv       [L, B*S*C*K]     [active, V, ...] from the start of the layer
    replay stash field      [L, B*S*elems]   (replay mode) likewise
    history ring field      [L, B*R*elems]   (checkpoint mode) [B, R, ...]: indexed by slot and ring step

Layer tensors handed out are views of these allocations.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._config import Config, format_bytes
from ..precision.quant8 import SLOT_SCALE_POOLS
from .backend import BackendHooks, StatePools
from .checkpoint import CheckpointOperations
from .checks import check_index
from .commits import CommitOperations
from .moving import MovingOperations
from .slots import SlotOperations

logger = logging.getLogger("mamba_cache")

__all__ = ["MambaCacheManagerBase"]


class MambaCacheManagerBase(SlotOperations, CommitOperations, CheckpointOperations, MovingOperations, BackendHooks):
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
        # Checkpoint mode: one allocation per ring field, [L, B*R*elems], then the counters h and p0.
        ring_fields = config.replay_stash_fields if config.has_history else {}
        ring_steps = config.max_batch_size * config.history_len
        for shape, dtype in ring_fields.values():
            shapes.append(((layers, ring_steps * int(np.prod(shape))), dtype))
        if ring_fields:
            shapes += [((config.max_batch_size,), np.dtype(np.int32)), ((config.max_batch_size,), np.dtype(np.int64))]
        # 8-bit states: float32 scales beside each 8-bit pool, bfloat16 residuals with error feedback.
        scale_pools = config.scale_pools()
        shapes += list(scale_pools.values())
        pools: list = []
        try:
            for shape, dtype in shapes:
                pools.append(self._zeros(shape, dtype, stream))
        except BaseException:
            pools.clear()  # leave no partial allocation behind
            self._release_partial()
            raise
        self._scales = dict(zip(scale_pools, pools[len(pools) - len(scale_pools) :], strict=True))
        extra = pools[main_pools : len(pools) - len(scale_pools)]
        self._stash = dict(zip(stash_fields, extra[: len(stash_fields)], strict=True))
        if ring_fields:
            self._history = dict(zip(ring_fields, extra[: len(ring_fields)], strict=True))
            self._history_lengths, self._checkpoint_positions = extra[len(ring_fields) :]
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

    # ------------------------------------------------------------ state
    def _become_empty(self) -> None:
        self._config = Config()
        self._pools: StatePools | None = None
        self._verify_shape = (0, 0)
        self._view_cache: dict = {}
        self._capture_outs: dict = {}
        self._closed = False
        self._stash: dict = {}  # replay mode: stash field name -> [L, B*S*elems] pool
        self._history: dict = {}  # checkpoint mode: ring field name -> [L, B*R*elems] pool
        self._scales: dict = {}  # 8-bit states: "scales_<pool>" / "residual_<kind>" -> stacked pool
        self._history_lengths = None  # checkpoint mode: h, int32 [B], ring steps past the checkpoint
        self._checkpoint_positions = None  # checkpoint mode: p0, int64 [B], tokens the checkpoint consumed
        self._offload = None  # offload_slots' host pool (core/moving.py), allocated on first use

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
        if flat is None and self._config.commit_mode == "checkpoint":
            raise ValueError(
                f"get_intermediate_{kind}_state: commit_mode='checkpoint' keeps no per-step states; "
                "the verify pass writes the history ring (get_history) instead"
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
    @property
    def pools(self) -> StatePools | None:
        """The four stacked allocations, to read: every layer and slot of each state kind in one array.

        ``recurrent [L, B, H, D, N]``, ``conv [L, B, C, K]``, and the per-step buffers
        ``intermediate_recurrent [L, B*S*H*D*N]`` / ``intermediate_conv [L, B*S*C*K]`` flat per layer
        (``None`` without them); in the config's dtypes (a bfloat16 pool is uint16 raw bits on the
        Numba backend). For tests, checkers and engines that inspect whole pools; write state
        through the layer views (``get_*_state``) and the operations. The NumPy reference returns
        read-only views; a Numba device array cannot be marked read-only, so there it is the pool
        itself. ``None`` when the manager has no layers, or was closed or moved from.
        """
        if self._pools is None:
            return None
        view = self._view_cache.get(("pools",))
        if view is None:
            view = self._view_cache[("pools",)] = StatePools(
                *(None if p is None else self._read_only(p) for p in self._pools)
            )
        return view

    @property
    def default_stream(self) -> Any:
        """The stream a call given ``stream=None`` queues its work on (read-only).

        The Numba backend: ``numba.cuda.default_stream()``, the legacy default stream; the NumPy
        backend: ``None`` (it has no streams). For work queued beside the cache's own, e.g. a chunked
        prefill (``TinyMamba2.prefill_chunked``), and for telling a store on which stream it was written.
        """
        return getattr(self._stream(None), "stream", None)  # Numba resolves None to a StreamRef

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
        has_view = self.has_intermediate_recurrent_states() or self._stash or self._history
        return self._verify_shape if has_view else (0, 0)

    def get_recurrent_state(self, recurrent_layer_idx: int) -> Any:
        """The recurrent state of one layer: a view of the pool, ``[B, H, D, N]``, recurrent dtype.

        Writes through the view change the cache. In checkpoint mode the pool holds each slot's
        checkpoint (the state after ``p0`` tokens), not the state after the ``h`` ring steps past
        it: read that with ``current_state`` (or fold it in with ``materialize``).

        Raises:
            IndexError: ``recurrent_layer_idx`` outside ``[0, num_layers())``, or no layers (also
                after ``close()``/``move()``).
            TypeError: ``recurrent_layer_idx`` is not an integer.
        """
        return self._layer("recurrent", recurrent_layer_idx)

    def get_conv_state(self, recurrent_layer_idx: int) -> Any:
        """The conv state of one layer: a view of the pool, ``[B, C, K]``, conv dtype.

        In checkpoint mode: the checkpoint's window (see ``get_recurrent_state``).

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
            ValueError: ``commit_mode="replay"`` or ``"checkpoint"``: no per-step states exist (see
                ``get_replay_stash``, ``get_history``).
        """
        return self._intermediate_layer("recurrent", recurrent_layer_idx)

    def get_intermediate_conv_state(self, recurrent_layer_idx: int) -> Any:
        """MTP intermediate conv states of one layer, ``[active, V, C, K]``, conv dtype.

        Raises:
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
            RuntimeError: the intermediate buffers are not allocated (``max_intermediate_seq_len == 0``).
            ValueError: ``commit_mode="replay"`` or ``"checkpoint"``: no per-step states exist (see
                ``get_replay_stash``, ``get_history``).
        """
        return self._intermediate_layer("conv", recurrent_layer_idx)

    # ------------------------------------------------------------ ownership
    # ------------------------------------------------------------ 8-bit states
    def _scale_layer(self, name: str, layer: Any, what: str) -> Any:
        """One layer of the 8-bit pool ``name`` (``Config.scale_pools``); per-step ones as ``[active, V, ...]``."""
        self._require_pools(what)
        index = check_index("recurrent_layer_idx", layer, self._config.num_recurrent_layers)
        pool = self._scales.get(name)
        if pool is None:
            kind = name.rsplit("_", 1)[-1]
            need = "error_feedback=True and an 8-bit" if name.startswith("residual_") else "an 8-bit"
            raise ValueError(
                f"{what}: this cache has no {name.replace('_', ' ')} (it needs {need} "
                f"{'per-step ' if 'intermediate' in name else ''}{kind} state dtype, see Config)"
            )
        key = (name, index)
        view = self._view_cache.get(key)
        if view is None:
            config = self._config
            view = pool[index]
            if "intermediate" in name:
                active, seq = self._verify_shape
                per_slot = (config.recurrent_scale_shape if name.endswith("recurrent") else config.conv_scale_shape)[1:]
                view = view[: active * seq * int(np.prod(per_slot))].reshape((active, seq, *per_slot))
            dtype = config.residual_dtype if name.startswith("residual_") else pool.dtype
            view = self._view_cache[key] = self._export(view, dtype)
        return view

    @property
    def scale_pools(self) -> dict:
        """The 8-bit states' extra pools, to read, by ``Config.scale_pools`` name (``{}`` without 8-bit states).

        ``scales_recurrent [L, B, H, D]``, ``scales_conv [L, B, ceil(C / 64), K]`` (float32),
        ``scales_intermediate_*`` flat per layer, ``residual_recurrent [L, B, H, D, N]`` (bfloat16);
        read-only views on NumPy, as ``pools``.
        """
        return {name: self._read_only(pool) for name, pool in self._scales.items()}

    def get_recurrent_scales(self, recurrent_layer_idx: int) -> Any:
        """The scales of an 8-bit recurrent pool, one layer: ``[B, H, D]`` float32, one per group of ``N``.

        Element ``[b, h, d, n]`` of ``get_recurrent_state`` reads as ``stored * scale[b, h, d]``
        ([`mamba_cache.precision.quant8`][mamba_cache.precision.quant8]). Every operation moves the
        scales with their states.

        Raises:
            ValueError: the recurrent state dtype is not 8-bit.
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
        """
        return self._scale_layer("scales_recurrent", recurrent_layer_idx, "get_recurrent_scales")

    def get_conv_scales(self, recurrent_layer_idx: int) -> Any:
        """The scales of an 8-bit conv pool, one layer: ``[B, ceil(C / 64), K]`` float32.

        Channel ``c`` of column ``k`` reads as ``stored * scale[b, c // 64, k]``; a column's scales
        move with it as the window shifts.

        Raises:
            ValueError: the conv state dtype is not 8-bit.
            IndexError: ``recurrent_layer_idx`` out of range, or no layers.
        """
        return self._scale_layer("scales_conv", recurrent_layer_idx, "get_conv_scales")

    def get_intermediate_recurrent_scales(self, recurrent_layer_idx: int) -> Any:
        """Scales of the 8-bit per-step recurrent states, ``[active, V, H, D]`` float32 (as the states' view).

        Raises:
            ValueError: the per-step recurrent dtype is not 8-bit (or there are no per-step states).
        """
        return self._scale_layer(
            "scales_intermediate_recurrent", recurrent_layer_idx, "get_intermediate_recurrent_scales"
        )

    def get_intermediate_conv_scales(self, recurrent_layer_idx: int) -> Any:
        """Scales of the 8-bit per-step conv windows, ``[active, V, ceil(C / 64), K]`` float32.

        Raises:
            ValueError: the per-step conv dtype is not 8-bit (or there are no per-step states).
        """
        return self._scale_layer("scales_intermediate_conv", recurrent_layer_idx, "get_intermediate_conv_scales")

    def get_recurrent_residual(self, recurrent_layer_idx: int) -> Any:
        """Error feedback: the residual of each recurrent element's last store, ``[B, H, D, N]`` bfloat16.

        Raises:
            ValueError: ``error_feedback`` is off or the recurrent dtype is not 8-bit.
        """
        return self._scale_layer("residual_recurrent", recurrent_layer_idx, "get_recurrent_residual")

    def get_conv_residual(self, recurrent_layer_idx: int) -> Any:
        """Error feedback: the residual of each conv element's last store, ``[B, C, K]`` bfloat16.

        Raises:
            ValueError: ``error_feedback`` is off or the conv dtype is not 8-bit.
        """
        return self._scale_layer("residual_conv", recurrent_layer_idx, "get_conv_residual")

    def _pool_dtype(self, pool: Any) -> np.dtype:
        """The dtype a stacked pool holds for the cache (a device pool may store it as raw bits)."""
        config = self._config
        if pool is self._pools.recurrent or pool is self._pools.conv:
            return config.recurrent_state_dtype if pool is self._pools.recurrent else config.conv_state_dtype
        return config.residual_dtype if pool is self._scales.get("residual_recurrent") else np.dtype(pool.dtype)

    def _moving_pools(self) -> tuple:
        """The stacked ``[L, B, ...]`` pools a slot's state lives in: recurrent, conv, any 8-bit scales, residuals."""
        extra = (self._scales.get(n) for n in SLOT_SCALE_POOLS)
        return (self._pools.recurrent, self._pools.conv, *(p for p in extra if p is not None))

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
