"""The loop of ``examples/integrate_engine.py`` in NumPy: the same layer, verify passes and commits.

It needs no PyTorch, so ``tests/test_integrate.py`` runs it everywhere; the torch file runs where
torch is installed. Function for function the two files are the same code, and the cache calls
(``reshape_intermediate_states``, ``get_intermediate_*``, ``get_replay_stash``,
``scatter_mtp_states`` / ``replay_mtp_states`` with ``state_indices``) are identical.
:func:`check` decodes speculatively on one cache and plainly on another; in float32 or float16 the
main states are bit-identical.
"""

from __future__ import annotations

import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager

LAYERS, HEADS, HEAD_DIM, STATE, GROUPS, KERNEL, VOCAB = 2, 4, 2, 4, 2, 4, 32
CHANNELS = HEADS * HEAD_DIM + 2 * GROUPS * STATE
F32 = np.float32


def make_config(commit_mode: str = "scatter", dtype: str = "float32", batch: int = 4, verify: int = 4) -> Config:
    """The cache config of ``integrate_engine.make_config``."""
    return Config(
        num_recurrent_layers=LAYERS,
        max_batch_size=batch,
        recurrent_state_num_heads=HEADS,
        recurrent_state_head_dim=HEAD_DIM,
        recurrent_state_size=STATE,
        n_groups=GROUPS,
        conv_dim=CHANNELS,
        conv_kernel=KERNEL,
        max_intermediate_seq_len=verify,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode=commit_mode,
        mixer="mamba2",
    )


def make_weights(seed: int = 0) -> list[dict]:
    """Random float32 weights of every layer."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(F32)

    return [
        {
            "in_proj": normal(VOCAB, CHANNELS + HEADS, scale=1.0),
            "conv_weight": normal(CHANNELS, KERNEL, scale=0.5),
            "conv_bias": normal(CHANNELS, scale=0.1),
            "dt_bias": normal(HEADS, scale=0.5) - F32(1),
            "A": -np.exp(normal(HEADS, scale=0.5)),
            "D": normal(HEADS, scale=1.0),
        }
        for _ in range(LAYERS)
    ]


def silu(v: np.ndarray) -> np.ndarray:
    """``v * sigmoid(v)`` in float32."""
    return v / (F32(1) + np.exp(-v))


def softplus(v: np.ndarray) -> np.ndarray:
    """``log(1 + exp(v))`` in float32, linear above 20."""
    return np.where(v > F32(20), v, np.log1p(np.exp(np.minimum(v, F32(20))))).astype(F32)


def mamba2_layer(w: dict, tokens: np.ndarray, h: np.ndarray, window: np.ndarray) -> tuple:
    """One token per row through one layer (``integrate_engine.mamba2_layer`` in NumPy)."""
    rows, per_group = tokens.shape[0], HEADS // GROUPS
    z = w["in_proj"][tokens]
    column = z[:, :CHANNELS].astype(window.dtype)
    window = np.concatenate([window[:, :, 1:], column[:, :, None]], axis=2)
    acc = w["conv_bias"] + window[:, :, 0].astype(F32) * w["conv_weight"][:, 0]
    for k in range(1, KERNEL):
        acc = acc + window[:, :, k].astype(F32) * w["conv_weight"][:, k]
    xbc = silu(acc)
    x = xbc[:, : HEADS * HEAD_DIM].reshape(rows, HEADS, HEAD_DIM)
    b_in = xbc[:, HEADS * HEAD_DIM : HEADS * HEAD_DIM + GROUPS * STATE].reshape(rows, GROUPS, STATE)
    c_out = xbc[:, HEADS * HEAD_DIM + GROUPS * STATE :].reshape(rows, GROUPS, STATE)
    dt = softplus(z[:, CHANNELS:] + w["dt_bias"])
    dA = np.exp(dt * w["A"])  # noqa: N806
    u = dt[:, :, None] * x
    b_heads = np.repeat(b_in, per_group, axis=1)
    c_heads = np.repeat(c_out, per_group, axis=1)
    h32 = h.astype(F32) * dA[:, :, None, None] + u[:, :, :, None] * b_heads[:, :, None, :]
    y = (h32 * c_heads[:, :, None, :]).sum(-1, dtype=F32) + w["D"][:, None] * x
    stash = {"dA": dA, "u": u, "B": b_in, "conv": column}
    return h32.astype(h.dtype), window, stash, y


def decode_step(cache, weights: list, tokens: np.ndarray, slots: np.ndarray, keep=None) -> None:
    """Plain decode: row ``b`` advances slot ``slots[b]`` by one token (rows with ``keep`` False: dropped)."""
    for layer, w in enumerate(weights):
        rec, conv = cache.get_recurrent_state(layer), cache.get_conv_state(layer)
        h, window, _, _ = mamba2_layer(w, tokens, rec[slots], conv[slots])
        if keep is not None:
            h = np.where(keep[:, None, None, None], h, rec[slots])
            window = np.where(keep[:, None, None], window, conv[slots])
        rec[slots] = h
        conv[slots] = window


# --8<-- [start:prefill-chunk]
def prefill_chunk(cache, weights: list, tokens: np.ndarray, slot: int) -> None:
    """The engine's prefill over one chunk of one request (here a token at a time; a real kernel scans it)."""
    for token in tokens:
        decode_step(cache, weights, np.array([token]), np.array([slot]))


# --8<-- [end:prefill-chunk]


def verify_scatter(cache, weights: list, drafts: np.ndarray, slots: np.ndarray) -> None:
    """Scatter mode: the state after step ``t`` of row ``b`` goes to the per-step buffers at ``[b, t]``."""
    active, verify_len = drafts.shape
    cache.reshape_intermediate_states(active, verify_len)
    for layer, w in enumerate(weights):
        rec, conv = cache.get_recurrent_state(layer), cache.get_conv_state(layer)
        steps_rec = cache.get_intermediate_recurrent_state(layer)
        steps_conv = cache.get_intermediate_conv_state(layer)
        h, window = rec[slots], conv[slots]
        for t in range(verify_len):
            h, window, _, _ = mamba2_layer(w, drafts[:, t], h, window)
            steps_rec[:, t] = h
            steps_conv[:, t] = window
        rec[slots] = h
        conv[slots] = window


def verify_replay(cache, weights: list, drafts: np.ndarray, slots: np.ndarray) -> None:
    """Replay mode: each step's inputs go to the stash at ``[b, t]``; the main pools are never written."""
    active, verify_len = drafts.shape
    cache.reshape_intermediate_states(active, verify_len)
    for layer, w in enumerate(weights):
        stash = cache.get_replay_stash(layer)
        h = cache.get_recurrent_state(layer)[slots]  # fancy indexing: a copy
        window = cache.get_conv_state(layer)[slots]
        for t in range(verify_len):
            h, window, fields, _ = mamba2_layer(w, drafts[:, t], h, window)
            for name, value in fields.items():
                stash[name][:, t] = value


def verify(cache, weights: list, drafts: np.ndarray, slots: np.ndarray) -> None:
    """The verify pass of the cache's commit mode."""
    if cache.get_config().commit_mode == "replay":
        verify_replay(cache, weights, drafts, slots)
    else:
        verify_scatter(cache, weights, drafts, slots)


def commit(cache, accept: np.ndarray, slots: np.ndarray, **tracking) -> None:
    """Keep each row's first ``accept[b]`` drafts: one call, every layer, both state kinds."""
    if cache.get_config().commit_mode == "replay":
        cache.replay_mtp_states(accept, state_indices=slots, **tracking)
    else:
        cache.scatter_mtp_states(accept, state_indices=slots, **tracking)


def pools_on_host(cache) -> list:
    """Every layer's main recurrent and conv state (copies)."""
    return [
        np.array(array)
        for layer in range(cache.num_layers())
        for array in (cache.get_recurrent_state(layer), cache.get_conv_state(layer))
    ]


def check(commit_mode: str = "scatter", dtype: str = "float32", rounds: int = 6, seed: int = 0) -> tuple:
    """Speculative decoding on one cache, plain decoding of the accepted tokens on another: both pools."""
    rng = np.random.default_rng(seed)
    weights = make_weights()
    config = make_config(commit_mode, dtype)
    verify_len = config.max_intermediate_seq_len
    spec = NumpyMambaCacheManager(config)
    plain = NumpyMambaCacheManager(make_config("scatter", dtype))
    slots = np.array([2, 0, 3], dtype=np.int32)
    prompt = rng.integers(0, VOCAB, (3, 5))
    for t in range(prompt.shape[1]):
        decode_step(spec, weights, prompt[:, t], slots)
        decode_step(plain, weights, prompt[:, t], slots)
    for _ in range(rounds):
        drafts = rng.integers(0, VOCAB, (3, verify_len))
        accept = rng.integers(1, verify_len + 1, 3).astype(np.int32)
        verify(spec, weights, drafts, slots)
        commit(spec, accept, slots)
        for t in range(verify_len):
            decode_step(plain, weights, drafts[:, t], slots, keep=accept > t)
    return pools_on_host(spec), pools_on_host(plain)
