"""A small Gated DeltaNet stack that uses the cache the way an inference engine does.

Random weights, no downloads. Letters (each with one meaning):

    L layers        H value heads       D key dim         N value dim       G key heads (n_groups)
    C conv channels = 2*G*D + H*N (q, k, v)              K conv width      M model width = H*N
    R rows in this call (one token each)                 V verify length

Recurrent state per slot ``[H, D, N]`` = ``[value heads, key dim, value dim]``. Per token and layer:

    z           = rmsnorm(x) @ in_proj                  [R, C + 2H]
    conv state  : shift left, append z[:, :C]           [B, C, K] (in place, conv dtype)
    qkv         = silu(sum_k(window * conv_weight) + conv_bias)        [R, C]
    q, k        = l2norm per key head of qkv[:, :GD], qkv[:, GD:2GD]   [R, G, D]
    v           = qkv[:, 2GD:]                                         [R, H, N]
    g           = exp(a * softplus(z[:, C:C+H] + dt_bias))             [R, H]  decay factor, a < 0
    beta        = sigmoid(z[:, C+H:])                                  [R, H]
    S           = gdn_step(S, g, beta, k, v)    (mamba_cache.replay.reference; value head i reads key head i // (H/G))
    o[i, e]     = sum_d S[i, d, e] * q[i // (H/G), d]                  [R, H, N]
    x           = x + o.reshape(R, M) @ out_proj                       [R, M]

Float32 arithmetic, states stored in the cache's dtypes. Verify, replay-mode scratch and sequential decoding work as in
[`mamba_cache.models.mamba2.TinyMamba2`][mamba_cache.models.mamba2.TinyMamba2] (this class reuses its driving methods);
the replay stash holds ``g``, ``beta``, ``k``, ``v`` and the conv column.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._config import Config
from ..replay.reference import gdn_step
from .chunked import gated_delta_chunked
from .mamba2 import TinyMamba2, matvec, rmsnorm, silu, softplus

__all__ = ["TinyGatedDeltaNet"]

F32 = np.float32


def l2norm(x: np.ndarray) -> np.ndarray:
    """``x / sqrt(sum(x**2) + 1e-6)`` over the last axis, float32 (the key/query normalisation)."""
    return x * (F32(1) / np.sqrt((x * x).sum(axis=-1, dtype=F32) + F32(1e-6)))[..., None]


class TinyGatedDeltaNet(TinyMamba2):
    """A random-weight Gated DeltaNet stack whose states live in a cache manager (``mixer="gdn"``).

    Args:
        config: the cache configuration; ``conv_dim`` must be ``2 * G * D + H * N`` and
            ``mixer`` ``"gdn"``.
        vocab_size: number of token ids.
        seed: seed of the random weights.

    Raises:
        ValueError: the config does not describe a Gated DeltaNet layer.
    """

    def __init__(self, config: Config, vocab_size: int = 64, seed: int = 0) -> None:
        layers, heads, dim, size, groups = (
            config.num_recurrent_layers,
            config.recurrent_state_num_heads,
            config.recurrent_state_head_dim,
            config.recurrent_state_size,
            config.n_groups,
        )
        if config.mixer != "gdn":
            raise ValueError(f"TinyGatedDeltaNet needs Config.mixer='gdn', got {config.mixer!r}")
        if (
            config.stochastic_rounding
            or config.quantised_kinds
            or "bfloat16"
            in (
                config.recurrent_state_dtype.name,
                config.conv_state_dtype.name,
            )
        ):
            raise ValueError("TinyGatedDeltaNet stores float16 / float32 / float64 states, rounded to nearest")
        if config.conv_dim != 2 * groups * dim + heads * size:
            raise ValueError(
                f"conv_dim must be 2 * G * D + H * N = {2 * groups * dim + heads * size} for TinyGatedDeltaNet, "
                f"got {config.conv_dim}"
            )
        self.config = config
        self.vocab_size = vocab_size
        width, channels = heads * size, config.conv_dim
        rng = np.random.default_rng(seed)

        def normal(*shape, scale):
            return (rng.standard_normal(shape) * scale).astype(F32)

        self.weights = {
            "embedding": normal(vocab_size, width, scale=1.0),  # [vocab, M]
            "in_proj": normal(layers, width, channels + 2 * heads, scale=width**-0.5),  # [L, M, C + 2H]
            "conv_weight": normal(layers, channels, config.conv_kernel, scale=0.5),  # [L, C, K]
            "conv_bias": normal(layers, channels, scale=0.1),  # [L, C]
            "dt_bias": normal(layers, heads, scale=0.5) - F32(1),  # [L, H]
            "a": -np.exp(normal(layers, heads, scale=0.5)),  # [L, H], < 0
            "out_proj": normal(layers, width, width, scale=0.5 * width**-0.5),  # [L, M, M]
        }
        self._device = None

    def _runner(self, cache: Any):
        if cache.backend == "numpy":
            return self
        if self._device is None:
            from .gdn_kernels import NumbaTinyGatedDeltaNet

            self._device = NumbaTinyGatedDeltaNet(self)
        return self._device

    def _chunk_mixer(self, layer: int, z: np.ndarray, xbc: np.ndarray, state: np.ndarray, chunk: int) -> tuple:
        """Gated DeltaNet over all ``T`` tokens: ``(o [T, H, N], boundary states, the per-token step's inputs)``."""
        w, config = self.weights, self.config
        heads, dim, size, groups = self._dims()
        count, channels, keys = z.shape[0], config.conv_dim, groups * dim
        q = l2norm(xbc[:, :keys].reshape(count, groups, dim))
        k = l2norm(xbc[:, keys : 2 * keys].reshape(count, groups, dim))
        v = xbc[:, 2 * keys :].reshape(count, heads, size)
        log_gate = w["a"][layer] * softplus(z[:, channels : channels + heads] + w["dt_bias"][layer])  # [T, H]
        beta = F32(1) / (F32(1) + np.exp(-z[:, channels + heads :]))
        o, states = gated_delta_chunked(state, log_gate, beta, k, v, q, chunk)
        return o, states, {"g": np.exp(log_gate), "beta": beta, "k": k, "v": v}

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
        """One token per row through every layer (``scratch``, ``ring``: as in `TinyMamba2._decode`)."""
        w, config = self.weights, self.config
        heads, dim, size, groups = (
            config.recurrent_state_num_heads,
            config.recurrent_state_head_dim,
            config.recurrent_state_size,
            config.n_groups,
        )
        channels, keys = config.conv_dim, groups * dim
        n = tokens.shape[0]
        x = w["embedding"][tokens]  # [R, M]
        for layer in range(config.num_recurrent_layers):
            z = matvec(rmsnorm(x), w["in_proj"][layer])  # [R, C + 2H]
            conv = cache.get_conv_state(layer) if scratch is None else scratch[layer][1]  # [B, C, K]
            window = np.concatenate([conv[slots, :, 1:], z[:, :channels, None].astype(conv.dtype)], axis=2)
            conv[slots] = window
            qkv = silu((window.astype(F32) * w["conv_weight"][layer]).sum(axis=2, dtype=F32) + w["conv_bias"][layer])
            q = l2norm(qkv[:, :keys].reshape(n, groups, dim))
            k = l2norm(qkv[:, keys : 2 * keys].reshape(n, groups, dim))
            v = qkv[:, 2 * keys :].reshape(n, heads, size)
            g = np.exp(w["a"][layer] * softplus(z[:, channels : channels + heads] + w["dt_bias"][layer]))  # [R, H]
            beta = F32(1) / (F32(1) + np.exp(-z[:, channels + heads :]))  # [R, H]
            rec = cache.get_recurrent_state(layer) if scratch is None else scratch[layer][0]  # [B, H, D, N]
            state = gdn_step(rec[slots].astype(F32), g, beta, k, v)  # the replay's step
            rec[slots] = state
            q_heads = np.repeat(q, heads // groups, axis=1)  # [R, H, D]
            o = (state * q_heads[..., None]).sum(axis=2, dtype=F32)  # [R, H, N]
            x = x + matvec(o.reshape(n, heads * size), w["out_proj"][layer])
            if ring is not None or (step is not None and scratch is not None):
                stash, at = (
                    (cache.get_replay_stash(layer), (slots, step)) if ring is None else (cache.get_history(layer), ring)
                )
                stash["g"][at] = g
                stash["beta"][at] = beta
                stash["k"][at] = k
                stash["v"][at] = v
                stash["conv"][at] = window[:, :, -1]
            elif step is not None:
                cache.get_intermediate_conv_state(layer)[slots, step] = window
                cache.get_intermediate_recurrent_state(layer)[slots, step] = state
        return x
