"""A small Mamba2-style model that uses the cache the way an inference engine does.

Random weights, no downloads. Glossary: every letter has one meaning. Upper case letters are
dimensions (as in `mamba_cache._config`); parameters and activations are lower-case words.

    L layers    B slots    H heads    D head dim    N state size    G B/C groups (n_groups; H % G == 0)
    C conv channels = H*D + 2GN       K conv width  M model width = H*D
    R rows in this call (one token each)            V verify length
    i, d, n  indices over H, D, N     t  draft step

Each layer is one Mamba2 mixer (``G`` B/C groups, head ``i`` reading group ``i // (H/G)``) with a
residual connection; per token and layer:

    z          = rmsnorm(hidden) @ in_proj                          [R, C + H]
    xbc_raw    = z[:, :C];  dt_raw = z[:, C:]
    conv state : shift left by one token, append xbc_raw            [B, C, K] (in place)
    xbc        = silu(sum_k(conv_state * conv_weight) + conv_bias)  [R, C]
    x, b_in, c_out = xbc[:, :H*D] as [R, H, D], xbc[:, H*D:H*D+GN], xbc[:, H*D+GN:] as [R, G, N]
    dt         = softplus(dt_raw + dt_bias);  decay = exp(dt * a)   [R, H]   (a = Mamba's A, < 0)
    h          = h * decay + (dt * x) (outer) b_in                  [B, H, D, N] (in place)
    y          = h . c_out[group of the head] + d_skip * x          [R, H, D]
    hidden    = hidden + y.reshape(R, H*D) @ out_proj             [R, M]

The replay stash keeps its own field names (``Config.replay_stash_fields``): ``dA`` = ``decay``, ``u`` = ``dt * x``,
``B`` = ``b_in`` (``[G, N]``), ``conv`` = ``xbc_raw`` in the conv dtype.

Arithmetic is float32; the states are stored in the cache's dtypes (any of float16, bfloat16,
float32, float64; with ``Config.stochastic_rounding`` a 16-bit state is rounded stochastically,
keyed by the tokens it has consumed: pass ``positions``). The conv output is computed from the stored (rounded) window
and ``y`` from the float32 ``h`` before it is stored, identically in both backends.
[`TinyMamba2.verify`][mamba_cache.models.mamba2.TinyMamba2.verify] runs V tokens and writes the state after each token
into the intermediate buffers and the state after all V into the main pool, as the C++ verify pass does;
``scatter_mtp_states`` then commits each row's accepted prefix.

The NumPy decode step is here; the Numba one (same function, on device arrays, in place) is in
`mamba_cache.models.mamba2_kernels`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._config import Config
from ..precision.reference import rounds_stochastically
from ..replay.reference import mamba2_step
from .chunked import advance, boundaries, conv_windows, ssd_chunked
from .prefill import PrefillPlan, plan_prefill

__all__ = ["TinyMamba2"]

F32 = np.float32


def silu(v: np.ndarray) -> np.ndarray:
    """``v * sigmoid(v)`` in float32."""
    return v / (F32(1) + np.exp(-v))


def matvec(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``values @ weight`` row by row, summed in input order: ``[R, I] x [I, O] -> [R, O]``.

    Unlike BLAS, the result of a row does not depend on how many rows there are, so decoding a
    row alone and inside a batch give the same bits (the sequential-equals-speculative check
    depends on it).
    """
    return (values[:, :, None] * weight[None]).sum(axis=1, dtype=F32)


def rmsnorm(values: np.ndarray) -> np.ndarray:
    """``values / sqrt(mean(values**2) + 1e-5)`` per row, float32 (no learned scale)."""
    mean_square = (values * values).sum(axis=1, dtype=F32) / F32(values.shape[1])
    return values * (F32(1) / np.sqrt(mean_square + F32(1e-5)))[:, None]


def softplus(v: np.ndarray) -> np.ndarray:
    """``log(1 + exp(v))`` in float32, linear above 20 as in Mamba's kernels."""
    return np.where(v > F32(20), v, np.log1p(np.exp(np.minimum(v, F32(20))))).astype(F32)


class TinyMamba2:
    """A random-weight Mamba2 stack whose recurrent and conv states live in a cache manager.

    Args:
        config: the cache configuration; ``conv_dim`` must be ``H * D + 2 * G * N`` (``G = n_groups``).
        vocab_size: number of token ids.
        seed: seed of the random weights.

    Raises:
        ValueError: ``conv_dim`` does not match the heads, head dim and state size.
    """

    def __init__(self, config: Config, vocab_size: int = 64, seed: int = 0) -> None:
        layers, heads, dim, state = (
            config.num_recurrent_layers,
            config.recurrent_state_num_heads,
            config.recurrent_state_head_dim,
            config.recurrent_state_size,
        )
        groups = config.n_groups  # Config checks that it divides H
        if config.quantised_kinds:
            raise ValueError(
                "TinyMamba2 does not decode into 8-bit states (its steps store float states; the cache's commits "
                f"quantise): got {' and '.join(config.quantised_kinds)} 8-bit"
            )
        if config.conv_dim != heads * dim + 2 * groups * state:
            raise ValueError(
                f"conv_dim must be H * D + 2 * G * N = {heads * dim + 2 * groups * state} for TinyMamba2, "
                f"got {config.conv_dim}"
            )
        self.config = config
        self.vocab_size = vocab_size
        width, channels = heads * dim, config.conv_dim
        rng = np.random.default_rng(seed)

        def normal(*shape, scale):
            return (rng.standard_normal(shape) * scale).astype(F32)

        self.weights = {
            "embedding": normal(vocab_size, width, scale=1.0),  # [vocab, M]
            "in_proj": normal(layers, width, channels + heads, scale=width**-0.5),  # [L, M, C + H]
            "conv_weight": normal(layers, channels, config.conv_kernel, scale=0.5),  # [L, C, K]
            "conv_bias": normal(layers, channels, scale=0.1),  # [L, C]
            "dt_bias": normal(layers, heads, scale=0.5) - F32(1),  # [L, H]
            "a": -np.exp(normal(layers, heads, scale=0.5)),  # [L, H], < 0 (Mamba's A)
            "d_skip": normal(layers, heads, scale=1.0),  # [L, H] (Mamba's D)
            "out_proj": normal(layers, width, width, scale=0.5 * width**-0.5),  # [L, H*D, M]
        }
        self._device = None  # the Numba runner, made on first use

    # ------------------------------------------------------------ dispatch
    def _runner(self, cache: Any):
        if cache.backend == "numpy":
            return self
        if self._device is None:
            from .mamba2_kernels import NumbaTinyMamba2

            self._device = NumbaTinyMamba2(self)
        return self._device

    def decode_step(
        self, cache: Any, tokens: Any, slots: Any = None, step: int | None = None, positions: Any = None
    ) -> Any:
        """Advance the state of each given slot by one token, in place in ``cache``.

        Args:
            cache: a Numpy- or NumbaMambaCacheManager built with this model's config.
            tokens: ``[R]`` int token ids (host array; the Numba runner copies it over).
            slots: ``[R]`` int slot of each token; ``None`` means ``0 .. R-1``.
            step: when given, also write the state after this token into the intermediate
                buffers at ``[slot, step]`` (of the current ``[active, V]`` view).
            positions: ``[R]`` int tokens each row's state had consumed before this token (the
                stored state has consumed one more); required with stochastic rounding. In
                checkpoint mode it is optional and, when given, must equal each slot's ``p0 + h``.

        Checkpoint mode (``commit_mode="checkpoint"``): the step is a verify window of length 1
        (reading the slot's state with ``state_after``, writing ring step ``h``) followed by
        ``checkpoint_mtp_states`` of one accepted step per row (``state_indices=slots``); the main
        pools change only when that commit folds. The verify view becomes ``[R, 1]``, and the output
        is a host array on both backends.

        Returns:
            ``[R, M]`` float32 layer-stack output (a host array for NumPy, a device array for Numba).
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        slots = np.arange(tokens.shape[0]) if slots is None else np.asarray(slots, dtype=np.int64)
        if cache.get_config().commit_mode == "checkpoint":
            if step is not None:
                raise ValueError("checkpoint mode has no intermediate buffers: use verify, not decode_step(step=...)")
            return self._checkpoint_decode(cache, tokens, slots, positions)
        if positions is None and self.config.stochastic_rounding:
            raise ValueError("positions is required: the cache rounds its 16-bit states stochastically")
        positions = np.zeros(tokens.shape[0], np.int64) if positions is None else np.asarray(positions, np.int64)
        return self._runner(cache)._decode(cache, tokens, slots, step, positions)

    def prefill(self, cache: Any, tokens: Any, positions: Any = None) -> None:
        """Run ``tokens`` ``[active, T]`` through slots ``0 .. active-1``, one token at a time.

        ``positions``: ``[active]`` tokens consumed before the first (default 0).

        Checkpoint mode: every token is a checkpoint-mode ``decode_step`` (a verify window of one
        step and its commit, folding when the ring is full), so the bits are those of sequential
        decoding and ``p0 + h`` counts the prompt. ``positions``, when given, must equal each slot's
        ``p0 + h`` (declare a slot's count with ``cache.set_positions`` first).
        """
        tokens = np.asarray(tokens)
        if positions is None and cache.get_config().commit_mode == "checkpoint":
            positions = self._slot_positions(cache, np.arange(tokens.shape[0]))
        start = np.zeros(tokens.shape[0], np.int64) if positions is None else np.asarray(positions, np.int64)
        for t in range(tokens.shape[1]):
            self.decode_step(cache, tokens[:, t], positions=start + t)

    def prefill_chunked(
        self,
        cache: Any,
        tokens: Any,
        slot: int,
        *,
        chunk_size: int = 64,
        checkpoints: Any = (),
        store: Any = None,
        entries: Any = None,
        checkpoint_slots: Any = None,
        position: int | None = None,
    ) -> Any:
        """Prefill one slot with a prompt chunk by chunk, writing the state after each checkpoint in the same pass.

        Each layer runs the whole prompt at once: the causal conv over all ``T`` tokens, then the mixer's
        chunked form (Mamba2's SSD scan, Gated DeltaNet's chunked delta rule;
        `mamba_cache.models.chunked`), which yields the state at every chunk boundary. The state after a
        checkpoint position on a boundary is that boundary's; inside a chunk it is the boundary state
        before it advanced by the per-token step. Recurrent state AND conv window go to the checkpoint's
        destination, stored to the pool's dtype once (rounded as the decode step rounds the state that
        has consumed ``position + p`` tokens); the slot ends holding the state after all ``T`` tokens.

        The chunked algebra sums in another order than the per-token decode, so the states equal
        [`prefill`][mamba_cache.models.mamba2.TinyMamba2.prefill]'s within the tolerance table of the docs
        ("Several checkpoints from one prefill"), not bit for bit; ``prefill`` and ``decode_step`` are
        unchanged. An engine's use (reserve, one call, publish) is ``admit`` in
        ``examples/integrate_chunked_prefill.py``.

        Args:
            cache: a Numpy- or NumbaMambaCacheManager built with this model's config (scatter or
                replay commit mode: the main pools hold the current states).
            tokens: ``[T]`` host int token ids, ``T >= 1``, each in ``[0, vocab_size)``.
            slot: the live slot, in ``[0, B)``; its current state is the state before ``tokens``.
            chunk_size: ``Q >= 1`` tokens per chunk (it need not divide ``T``).
            checkpoints: ``[n]`` distinct positions in ``[1, T]``: ``p`` is the state after ``tokens[:p]``.
            store: the [`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] whose entries receive them.
            entries: ``[n]`` entries of ``store`` from ``store.reserve()`` (distinct), one per checkpoint;
                afterwards ``store.publish(entries[i], prompt[:checkpoints[i]])`` keys each (or
                ``release``). The store is told of the write (``tracked_on``), as a tracking commit does.
            checkpoint_slots: instead of entries, ``[n]`` distinct slots in ``[0, B)`` other than ``slot``.
            position: tokens ``slot`` had consumed before ``tokens`` (default 0; required when a 16-bit
                state rounds stochastically).

        Returns:
            ``[T, M]`` float32 layer-stack outputs of every prompt token (a host array for NumPy, a
            device array for Numba: a buffer of the model's reused scratch, overwritten by its next
            chunked prefill with the same chunk size on that device; it runs on ``cache.default_stream``
            and allocates nothing after the first call of its size).

        Raises:
            ValueError / IndexError / TypeError: a bad argument (see
                [`plan_prefill`][mamba_cache.models.prefill.plan_prefill]); nothing was changed.
        """
        plan = plan_prefill(
            self, cache, tokens, slot, chunk_size, checkpoints, store, entries, checkpoint_slots, position
        )
        out = self._runner(cache)._prefill_chunked(cache, plan)
        if plan.store is not None and plan.positions.size:
            plan.store.tracked_on(cache.default_stream)  # the chunked kernels run on it
        return out

    def decode_accepted(self, cache: Any, draft_tokens: Any, accept_lengths: Any, positions: Any = None) -> None:
        """Plain decoding of only the accepted drafts, the state speculative decoding must reproduce.

        Row ``b`` decodes ``draft_tokens[b, :accept_lengths[b]]`` one token at a time in slot ``b``.

        Args:
            cache: the manager whose slots ``0 .. active-1`` are decoded in place.
            draft_tokens: ``[active, V]`` host token ids.
            accept_lengths: ``[active]`` host ints.
            positions: ``[active]`` tokens each row had consumed before the drafts (default 0; in
                checkpoint mode each slot's ``p0 + h``).
        """
        draft_tokens = np.asarray(draft_tokens)
        if positions is None and cache.get_config().commit_mode == "checkpoint":
            positions = self._slot_positions(cache, np.arange(draft_tokens.shape[0]))
        start = np.zeros(draft_tokens.shape[0], np.int64) if positions is None else np.asarray(positions, np.int64)
        for row, accepted in enumerate(np.asarray(accept_lengths)):
            for t in range(int(accepted)):
                self.decode_step(cache, [draft_tokens[row, t]], slots=[row], positions=[start[row] + t])

    def verify(self, cache: Any, draft_tokens: Any, positions: Any = None) -> np.ndarray | None:
        """The MTP verify pass over ``draft_tokens`` ``[active, V]`` for slots ``0 .. active-1``.

        Scatter mode: reshapes the intermediate buffers to ``[active, V]``, writes the state after
        each draft token there, and leaves the state after all V tokens in the main pool.
        ``positions``: ``[active]`` tokens each row had consumed before the drafts (default 0).

        Replay mode (``commit_mode="replay"``): reshapes the stash to ``[active, V]`` and writes each
        step's inputs there (``dA``, ``u = dt * x``, ``B``, and the conv input column); the main
        pools are NOT written: the pass runs on a scratch copy of the rows' states
        ([`scratch_bytes`][mamba_cache.models.mamba2.TinyMamba2.scratch_bytes]), and ``replay_mtp_states`` then
        recomputes the accepted steps.

        Checkpoint mode (``commit_mode="checkpoint"``): window step ``t`` of row ``b`` (slot ``b``) reads
        the state before it with [`state_after`][mamba_cache.checkpoint.reference.state_after] (NumPy) or
        the device functions of [`mamba_cache.checkpoint.reading`][mamba_cache.checkpoint.reading] (Numba):
        the checkpoint advanced through ring steps ``0 .. h_b + t - 1``; it runs the decode step on that
        copy, and writes the step's stash fields into the history ring at ring step ``h_b + t``; the main
        pools are NOT written.
        ``checkpoint_mtp_states`` then counts (and, when the ring is full, folds) the accepted
        steps. ``positions`` is optional there (it must equal ``p0 + h``). Returns the layer-stack
        outputs ``[active, V, M]`` float32 (a host array on both backends) of every window step in this
        mode, ``None`` in the others.
        """
        draft_tokens = np.asarray(draft_tokens)
        active, verify_len = draft_tokens.shape
        cache.reshape_intermediate_states(active, verify_len)
        if cache.get_config().commit_mode == "checkpoint":
            tokens = np.ascontiguousarray(draft_tokens, dtype=np.int64)
            return self._checkpoint_window(cache, tokens, np.arange(active), positions)
        start = np.zeros(active, np.int64) if positions is None else np.asarray(positions, np.int64)
        if cache.get_config().commit_mode == "replay":
            self._runner(cache)._verify_replay(cache, np.ascontiguousarray(draft_tokens, dtype=np.int64), start)
            return
        for t in range(verify_len):
            self.decode_step(cache, draft_tokens[:, t], step=t, positions=start + t)
        return None

    def scratch_bytes(self, active: int) -> int:
        """Bytes of the scratch states a replay-mode verify pass of ``active`` rows keeps (all layers).

        The pass must not write the main pools, so it advances a copy of each row's recurrent and
        conv state: ``L * active * (H*D*N * recurrent itemsize + C*K * conv itemsize)``. Not part of
        the cache: an engine fuses this into its verify kernel's registers / shared memory.
        """
        config = self.config
        per_row = config.recurrent_slot_elems * config.recurrent_state_dtype.itemsize
        per_row += config.conv_slot_elems * config.conv_state_dtype.itemsize
        return config.num_recurrent_layers * active * per_row

    def _verify_replay(self, cache: Any, draft_tokens: np.ndarray, start: Any = None) -> None:
        active = draft_tokens.shape[0]
        start = np.zeros(active, np.int64) if start is None else start  # tokens consumed before the drafts
        scratch = [
            (cache.get_recurrent_state(layer)[:active].copy(), cache.get_conv_state(layer)[:active].copy())
            for layer in range(self.config.num_recurrent_layers)
        ]
        for t in range(draft_tokens.shape[1]):
            self._decode(cache, draft_tokens[:, t], np.arange(active), t, positions=start + t, scratch=scratch)

    # ------------------------------------------------------------ checkpoint mode
    @staticmethod
    def _slot_positions(cache: Any, slots: np.ndarray) -> np.ndarray:
        """``p0 + h`` of each slot: the tokens its current state has consumed (checkpoint mode)."""
        return cache.checkpoint_positions()[slots] + cache.history_lengths()[slots].astype(np.int64)

    def _checkpoint_window(
        self, cache: Any, draft_tokens: np.ndarray, slots: np.ndarray, positions: Any = None
    ) -> np.ndarray:
        """Checkpoint mode's verify pass over ``draft_tokens`` ``[n, V]`` for distinct ``slots`` ``[n]``.

        Window step ``t`` of row ``b`` reads the state before it with ``state_after`` (slot
        ``slots[b]``'s checkpoint advanced through ring steps ``0 .. h + t - 1``: the library's reading
        function, so the order of operations is the fold's), runs ``_decode`` on that copy and writes
        the step's stash fields at ring step ``h + t``. The main pools are never written. Returns the
        outputs ``[n, V, M]``.
        """
        from ..checkpoint.reference import state_after

        config = cache.get_config()
        rows, verify_len = draft_tokens.shape
        ring_steps = cache.history_lengths()[slots].astype(np.int64)
        p0 = cache.checkpoint_positions()[slots]
        if positions is not None and not np.array_equal(np.asarray(positions, np.int64).reshape(-1), p0 + ring_steps):
            raise ValueError(
                f"positions must equal each slot's p0 + h ({(p0 + ring_steps).tolist()}) in checkpoint mode, got "
                f"{np.asarray(positions).tolist()} (declare a slot's count with set_positions)"
            )
        if (ring_steps + verify_len > config.history_len).any():
            raise ValueError(f"the ring cannot hold a window of {verify_len} steps past h = {ring_steps.tolist()}")
        if cache.backend != "numpy":  # the same window on the device, reading through checkpoint.reading
            return self._runner(cache)._checkpoint_window(cache, draft_tokens, slots, ring_steps, p0)
        layers = range(config.num_recurrent_layers)
        recurrent = np.stack([cache.get_recurrent_state(layer) for layer in layers])  # the checkpoints [L, B, ...]
        conv = np.stack([cache.get_conv_state(layer) for layer in layers])
        outputs = []
        for t in range(verify_len):
            history = {
                name: np.stack([cache.get_history(layer)[name] for layer in layers])
                for name in config.replay_stash_fields
            }  # [L, B, R, ...], ring steps up to h + t - 1 written by this window's earlier steps
            before_r, before_c = state_after(config, recurrent, conv, history, slots, ring_steps + t, p0)
            scratch = [(before_r[layer], before_c[layer]) for layer in layers]  # [n, ...] per layer, row-indexed
            out = self._decode(
                cache,
                draft_tokens[:, t],
                np.arange(rows),
                None,
                positions=p0 + ring_steps + t,
                scratch=scratch,
                ring=(slots, ring_steps + t),
            )
            outputs.append(out)
        return np.stack(outputs, axis=1)

    def _checkpoint_decode(self, cache: Any, tokens: np.ndarray, slots: np.ndarray, positions: Any) -> np.ndarray:
        """A plain decode step in checkpoint mode: a verify window of one step, then its commit."""
        rows = tokens.shape[0]
        cache.reshape_intermediate_states(rows, 1)
        out = self._checkpoint_window(cache, tokens[:, None], slots, positions)
        cache.checkpoint_mtp_states(np.ones(rows, np.int32), state_indices=slots.astype(np.int32))
        return out[:, 0]

    # ------------------------------------------------------------ the NumPy chunked prefill
    def _prefill_chunked(self, cache: Any, plan: PrefillPlan) -> np.ndarray:
        """NumPy body of `prefill_chunked`: every layer over all ``T`` tokens, destinations written per layer."""
        w, config = self.weights, self.config
        channels, count = config.conv_dim, plan.tokens.shape[0]
        every = np.append(plan.positions, count)  # the checkpoints, then the slot's final state
        edges = boundaries(count, plan.chunk)
        hidden = w["embedding"][plan.tokens]  # [T, M]
        for layer in range(config.num_recurrent_layers):
            z = matvec(rmsnorm(hidden), w["in_proj"][layer])  # [T, C + ...]
            rec, conv = cache.get_recurrent_state(layer), cache.get_conv_state(layer)
            columns = self._conv_columns(z[:, :channels], conv.dtype, layer, plan.start)  # [T, C], as stored
            windows = conv_windows(conv[plan.slot], columns)  # [T + 1, C, K]
            kernel_in = windows[1:].astype(F32) * w["conv_weight"][layer]  # the decode step's conv, per token
            xbc = silu(kernel_in.sum(axis=2, dtype=F32) + w["conv_bias"][layer])  # [T, C]
            out, states, inputs = self._chunk_mixer(layer, z, xbc, rec[plan.slot].astype(F32), plan.chunk)
            hidden = hidden + matvec(out.reshape(count, -1), w["out_proj"][layer])
            after = np.stack([advance(config.mixer, states, edges, int(p), inputs) for p in every])  # [n + 1, H, D, N]
            if self._rounds(rec.dtype):
                after = self._store(after, rec.dtype, 0, layer, plan.start + every - 1)
            n = plan.positions.shape[0]
            pools = (rec, conv) if plan.store is None else tuple(pool[layer] for pool in plan.entry_pools)
            pools[0][plan.targets] = after[:n]
            pools[1][plan.targets] = windows[plan.positions]
            rec[plan.slot] = after[n]
            conv[plan.slot] = windows[count]
        return hidden

    def _conv_columns(self, values: np.ndarray, dtype: Any, layer: int, start: int) -> np.ndarray:
        """The conv input columns ``[T, C]`` float32 as the decode step stores them into the window."""
        if not self._rounds(dtype):
            return values.astype(dtype)
        # the decode step rounds its whole new window keyed by (element c*K + k, position); only the new
        # column (k = K - 1) is inexact, so round each column in that place of an otherwise zero window
        kernel = self.config.conv_kernel
        window = np.zeros((*values.shape, kernel), dtype=F32)
        window[:, :, -1] = values
        return self._store(window, dtype, 1, layer, start + np.arange(values.shape[0]))[:, :, -1]

    def _dims(self) -> tuple[int, int, int, int]:
        """``(H, D, N, G)``: heads, head dim, state size, groups (GDN: value heads, key dim, value dim, key heads)."""
        config = self.config
        return (
            config.recurrent_state_num_heads,
            config.recurrent_state_head_dim,
            config.recurrent_state_size,
            config.n_groups,
        )

    def _chunk_mixer(self, layer: int, z: np.ndarray, xbc: np.ndarray, state: np.ndarray, chunk: int) -> tuple:
        """Mamba2 over all ``T`` tokens: ``(y [T, H, D], boundary states, the per-token step's inputs)``."""
        w, config = self.weights, self.config
        heads, dim, size, groups = self._dims()
        count, width, channels = z.shape[0], heads * dim, config.conv_dim
        x = xbc[:, :width].reshape(count, heads, dim)
        b_in = xbc[:, width : width + groups * size].reshape(count, groups, size)
        c_out = xbc[:, width + groups * size :].reshape(count, groups, size)
        dt = softplus(z[:, channels:] + w["dt_bias"][layer])  # [T, H]
        log_decay = dt * w["a"][layer]
        u = dt[:, :, None] * x  # [T, H, D]
        y, states = ssd_chunked(state, log_decay, u, b_in, c_out, chunk)
        y = y + w["d_skip"][layer][None, :, None] * x
        return y, states, {"dA": np.exp(log_decay), "u": u, "B": b_in}

    # ------------------------------------------------------------ the NumPy decode step
    def _store(self, values: np.ndarray, dtype: Any, kind: int, layer: int, positions: np.ndarray) -> np.ndarray:
        """``values`` ``[R, ...]`` float32 as a 16-bit state stores them with stochastic rounding."""
        from ..precision import convert

        flat = convert(
            values.reshape(values.shape[0], -1),
            dtype,
            stochastic=True,
            seed=self.config.rounding_seed,
            kind=kind,
            layer=layer,
            position=positions + 1,
        )
        return flat.reshape(values.shape)

    def _rounds(self, dtype: Any) -> bool:
        return rounds_stochastically(self.config.stochastic_rounding, dtype)

    def _decode(
        self,
        cache: Any,
        tokens: np.ndarray,
        slots: np.ndarray,
        step: int | None,
        positions: np.ndarray | None = None,
        scratch: list | None = None,
        ring: tuple | None = None,
    ) -> np.ndarray:
        """One token per row through every layer.

        ``positions``: ``[R]`` tokens each row's state had consumed (stochastic rounding keys).
        ``scratch`` (replay-mode verify): per layer the ``(recurrent, conv)`` copies to advance
        instead of the cache's pools; step ``step``'s inputs then go to the replay stash.
        ``ring`` (checkpoint-mode verify, with ``scratch``): ``(slots [R], ring steps [R])``, where
        the step's inputs go in the history ring (``cache.get_history``).
        """
        w, config = self.weights, self.config
        heads, dim, state, groups = (
            config.recurrent_state_num_heads,
            config.recurrent_state_head_dim,
            config.recurrent_state_size,
            config.n_groups,
        )
        channels, width = config.conv_dim, heads * dim
        rows = tokens.shape[0]
        hidden = w["embedding"][tokens]  # [R, M]
        for layer in range(config.num_recurrent_layers):
            z = matvec(rmsnorm(hidden), w["in_proj"][layer])  # [R, C + H]
            conv = cache.get_conv_state(layer) if scratch is None else scratch[layer][1]  # [B, C, K]
            if self._rounds(conv.dtype):  # the older columns are exact: only the new one rounds
                window32 = np.concatenate([conv[slots, :, 1:].astype(F32), z[:, :channels, None]], axis=2)
                window = self._store(window32, conv.dtype, 1, layer, positions)
            else:
                window = np.concatenate([conv[slots, :, 1:], z[:, :channels, None].astype(conv.dtype)], axis=2)
            conv[slots] = window
            xbc = silu((window.astype(F32) * w["conv_weight"][layer]).sum(axis=2, dtype=F32) + w["conv_bias"][layer])
            x = xbc[:, :width].reshape(rows, heads, dim)
            b_in = xbc[:, width : width + groups * state].reshape(rows, groups, state)  # [R, G, N]
            c_out = xbc[:, width + groups * state :].reshape(rows, groups, state)  # [R, G, N]
            dt = softplus(z[:, channels:] + w["dt_bias"][layer])  # [R, H]
            decay = np.exp(dt * w["a"][layer])  # [R, H]
            rec = cache.get_recurrent_state(layer) if scratch is None else scratch[layer][0]  # [B, H, D, N]
            dtx = dt[:, :, None] * x  # [R, H, D]
            h = mamba2_step(rec[slots].astype(F32), decay, dtx, b_in)  # the replay's step
            rec[slots] = self._store(h, rec.dtype, 0, layer, positions) if self._rounds(rec.dtype) else h
            c_heads = np.repeat(c_out, heads // groups, axis=1)  # [R, H, N]: each head's group
            y = (h * c_heads[:, :, None, :]).sum(axis=3, dtype=F32) + w["d_skip"][layer][None, :, None] * x
            hidden = hidden + matvec(y.reshape(rows, width), w["out_proj"][layer])
            if ring is not None or (step is not None and scratch is not None):
                stash, at = (
                    (cache.get_replay_stash(layer), (slots, step)) if ring is None else (cache.get_history(layer), ring)
                )
                stash["dA"][at] = decay
                stash["u"][at] = dtx
                stash["B"][at] = b_in
                stash["conv"][at] = window[:, :, -1]
            elif step is not None:
                inter_conv = cache.get_intermediate_conv_state(layer)
                inter_rec = cache.get_intermediate_recurrent_state(layer)
                if self._rounds(inter_conv.dtype) and inter_conv.dtype != window.dtype:
                    inter_conv[slots, step] = self._store(window.astype(F32), inter_conv.dtype, 1, layer, positions)
                else:
                    inter_conv[slots, step] = window
                if self._rounds(inter_rec.dtype):
                    inter_rec[slots, step] = self._store(h, inter_rec.dtype, 0, layer, positions)
                else:
                    inter_rec[slots, step] = h
        return hidden
