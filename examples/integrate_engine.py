"""Integrate with your engine: a hand-written Mamba2-like layer in PyTorch writing the cache's pools.

The docs pages under ``docs/integrate/`` include their code from this file (``--8<--`` sections),
and ``tests/test_integrate.py`` runs it: on the CPU with ``NumpyMambaCacheManager`` (the pools are
NumPy arrays, ``torch.from_numpy`` shares them), on a GPU with ``NumbaMambaCacheManager`` (device
arrays, ``torch.as_tensor(..., device="cuda")`` shares them through ``__cuda_array_interface__``).
Nothing here uses the library's tiny models: every state write an engine's kernels make is written
out below, in plain torch ops.

The layer is Mamba2's recurrence with G groups of B/C channels. To keep the example about the cache,
each layer reads its input from its own token table (a real model computes it from the hidden state
of the layer below, ``rmsnorm(hidden) @ in_proj``); everything from the conv window on is the real
recurrence.

``python examples/integrate_engine.py [--device cuda]`` runs speculative decoding in both commit
modes and checks it against plain decoding of the accepted tokens (see :func:`check`).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

if __name__ == "__main__":  # run as a script from a checkout: import this checkout's mamba_cache
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba_cache import Config, NumpyMambaCacheManager

LAYERS, HEADS, HEAD_DIM, STATE, GROUPS, KERNEL, VOCAB = 2, 4, 2, 4, 2, 4, 32
CHANNELS = HEADS * HEAD_DIM + 2 * GROUPS * STATE  # conv channels: x, then B and C of every group


# --8<-- [start:config]
def make_config(commit_mode: str = "scatter", dtype: str = "float32", batch: int = 4, verify: int = 4) -> Config:
    """The cache of a 2-layer Mamba2 stack: 4 heads of 2 x 4, 2 groups, conv width 4, verify length 4."""
    return Config(
        num_recurrent_layers=LAYERS,
        max_batch_size=batch,  # B slots
        recurrent_state_num_heads=HEADS,  # H
        recurrent_state_head_dim=HEAD_DIM,  # D
        recurrent_state_size=STATE,  # N
        n_groups=GROUPS,  # G (the replay stash keeps B per group)
        conv_dim=CHANNELS,  # C
        conv_kernel=KERNEL,  # K
        max_intermediate_seq_len=verify,  # S: the longest verify window
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode=commit_mode,  # "scatter" (default) or "replay"
        mixer="mamba2",
    )


# --8<-- [end:config]


def make_weights(device: str = "cpu", seed: int = 0) -> list[dict]:
    """Random float32 weights of every layer (drawn on the CPU, so every device gets the same)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    return [
        {
            "in_proj": normal(VOCAB, CHANNELS + HEADS, scale=1.0),  # token -> conv column and dt
            "conv_weight": normal(CHANNELS, KERNEL, scale=0.5),
            "conv_bias": normal(CHANNELS, scale=0.1),
            "dt_bias": normal(HEADS, scale=0.5) - 1,
            "A": -torch.exp(normal(HEADS, scale=0.5)),  # Mamba's A < 0
            "D": normal(HEADS, scale=1.0),
        }
        for _ in range(LAYERS)
    ]


# --8<-- [start:layer]
def mamba2_layer(w: dict, tokens: torch.Tensor, h: torch.Tensor, window: torch.Tensor) -> tuple:
    """One token per row through one layer: what the engine's decode / verify kernel computes.

    ``h`` ``[R, H, D, N]`` and ``window`` ``[R, C, K]`` are read in the pools' dtypes and not written.
    Returns the new ``h`` and ``window`` (in those dtypes, as the pools store them), this step's
    replay stash fields, and the output ``y`` ``[R, H, D]``.
    """
    rows, per_group = tokens.shape[0], HEADS // GROUPS
    z = w["in_proj"][tokens]  # [R, C + H] (a real model: rmsnorm(hidden) @ in_proj)
    column = z[:, :CHANNELS].to(window.dtype)  # the conv input column, in the conv dtype
    window = torch.cat([window[:, :, 1:], column[:, :, None]], dim=2)  # shift it into the window
    acc = w["conv_bias"] + window[:, :, 0].float() * w["conv_weight"][:, 0]
    for k in range(1, KERNEL):
        acc = acc + window[:, :, k].float() * w["conv_weight"][:, k]
    xbc = F.silu(acc)  # [R, C]
    x = xbc[:, : HEADS * HEAD_DIM].reshape(rows, HEADS, HEAD_DIM)
    b_in = xbc[:, HEADS * HEAD_DIM : HEADS * HEAD_DIM + GROUPS * STATE].reshape(rows, GROUPS, STATE)
    c_out = xbc[:, HEADS * HEAD_DIM + GROUPS * STATE :].reshape(rows, GROUPS, STATE)
    dt = F.softplus(z[:, CHANNELS:] + w["dt_bias"])  # [R, H]
    dA = torch.exp(dt * w["A"])  # [R, H]  # noqa: N806
    u = dt[:, :, None] * x  # [R, H, D]
    b_heads = b_in[:, :, None, :].expand(rows, GROUPS, per_group, STATE).reshape(rows, HEADS, STATE)
    c_heads = c_out[:, :, None, :].expand(rows, GROUPS, per_group, STATE).reshape(rows, HEADS, STATE)
    # the recurrence, in float32: two rounded products and a rounded sum, as the replay commit does
    h32 = h.float() * dA[:, :, None, None] + u[:, :, :, None] * b_heads[:, :, None, :]
    y = (h32 * c_heads[:, :, None, :]).sum(-1) + w["D"][:, None] * x
    stash = {"dA": dA, "u": u, "B": b_in, "conv": column}  # what replay mode keeps per row and step
    return h32.to(h.dtype), window, stash, y


# --8<-- [end:layer]


# --8<-- [start:pool]
def pool(array) -> torch.Tensor:
    """A torch tensor sharing a cache buffer's memory: no copy, writes go to the cache."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)  # NumpyMambaCacheManager: host memory
    return torch.as_tensor(array, device="cuda")  # NumbaMambaCacheManager: __cuda_array_interface__


# --8<-- [end:pool]


# --8<-- [start:decode]
def decode_step(cache, weights: list, tokens: torch.Tensor, slots: torch.Tensor, keep=None) -> None:
    """Plain decode (and prefill, a token at a time): row ``b`` advances slot ``slots[b]`` in place.

    ``keep`` ``[R]`` bool (default: every row) selects the rows whose result is written back; the
    others are computed and dropped, so the shapes never change (no host sync, graph-capturable).
    """
    for layer, w in enumerate(weights):
        rec, conv = pool(cache.get_recurrent_state(layer)), pool(cache.get_conv_state(layer))
        h, window, _, _ = mamba2_layer(w, tokens, rec[slots], conv[slots])
        if keep is not None:
            h = torch.where(keep[:, None, None, None], h, rec[slots])
            window = torch.where(keep[:, None, None], window, conv[slots])
        rec[slots] = h  # the main pools, [B, H, D, N] and [B, C, K]: indexed by slot
        conv[slots] = window


# --8<-- [end:decode]


# --8<-- [start:verify-scatter]
def verify_scatter(cache, weights: list, drafts: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter mode: the state after draft step ``t`` of row ``b`` goes to the per-step buffers at ``[b, t]``."""
    active, verify_len = drafts.shape
    cache.reshape_intermediate_states(active, verify_len)  # per-step views are now [active, V, ...]
    for layer, w in enumerate(weights):
        rec, conv = pool(cache.get_recurrent_state(layer)), pool(cache.get_conv_state(layer))
        steps_rec = pool(cache.get_intermediate_recurrent_state(layer))  # [active, V, H, D, N]
        steps_conv = pool(cache.get_intermediate_conv_state(layer))  # [active, V, C, K]
        h, window = rec[slots], conv[slots]
        for t in range(verify_len):  # a real kernel runs the V tokens as one chunk
            h, window, _, _ = mamba2_layer(w, drafts[:, t], h, window)
            steps_rec[:, t] = h  # indexed by ROW b, not by slot
            steps_conv[:, t] = window
        rec[slots] = h  # verify_writes_main_pool=True (the default): the state after all V tokens
        conv[slots] = window


# --8<-- [end:verify-scatter]


# --8<-- [start:verify-replay]
def verify_replay(cache, weights: list, drafts: torch.Tensor, slots: torch.Tensor) -> None:
    """Replay mode: each step's inputs go to the stash at ``[b, t]``; the main pools are never written."""
    active, verify_len = drafts.shape
    cache.reshape_intermediate_states(active, verify_len)  # stash views are now [active, V, ...]
    for layer, w in enumerate(weights):
        stash = {name: pool(view) for name, view in cache.get_replay_stash(layer).items()}
        h = pool(cache.get_recurrent_state(layer))[slots]  # a gathered copy: scratch, not the pool
        window = pool(cache.get_conv_state(layer))[slots]
        for t in range(verify_len):
            h, window, fields, _ = mamba2_layer(w, drafts[:, t], h, window)
            for name, value in fields.items():  # dA [H], u [H, D], B [G, N] float32; conv [C]
                stash[name][:, t] = value


# --8<-- [end:verify-replay]


# --8<-- [start:commit]
def verify(cache, weights: list, drafts: torch.Tensor, slots: torch.Tensor) -> None:
    """The verify pass of the cache's commit mode."""
    if cache.get_config().commit_mode == "replay":
        verify_replay(cache, weights, drafts, slots)
    else:
        verify_scatter(cache, weights, drafts, slots)


def commit(cache, accept: torch.Tensor, slots: torch.Tensor, stream=None, **tracking) -> None:
    """Keep each row's first ``accept[b]`` drafts: one launch, every layer, both state kinds."""
    if cache.get_config().commit_mode == "replay":
        cache.replay_mtp_states(accept, stream, state_indices=slots, **tracking)  # recompute steps 0..a-1
    else:
        cache.scatter_mtp_states(accept, stream, state_indices=slots, **tracking)  # copy step a-1


# --8<-- [end:commit]


def make_cache(config: Config, device: str):
    """A cache on ``device``: the NumPy reference on ``"cpu"``, the Numba backend on ``"cuda"``."""
    if device == "cpu":
        return NumpyMambaCacheManager(config)
    from mamba_cache import NumbaMambaCacheManager

    return NumbaMambaCacheManager(config, stream=torch.cuda.current_stream())


def pools_on_host(cache) -> list:
    """Every layer's main recurrent and conv state as NumPy arrays (copies)."""
    out = []
    for layer in range(cache.num_layers()):
        for array in (cache.get_recurrent_state(layer), cache.get_conv_state(layer)):
            out.append(pool(array).cpu().numpy().copy())
    return out


# --8<-- [start:check]
def check(device: str = "cpu", commit_mode: str = "scatter", dtype: str = "float32", rounds: int = 6, seed: int = 0):
    """Speculative decoding on one cache, plain decoding of the accepted tokens on another.

    Returns ``(speculative, plain)``: every layer's main states of both (host copies), which the
    caller compares. Rows map to slots through ``state_indices`` (slot 1 is never used).
    """
    rng = np.random.default_rng(seed)
    weights = make_weights(device)
    config = make_config(commit_mode, dtype)
    verify_len = config.max_intermediate_seq_len
    spec = make_cache(config, device)  # speculative decoding, in `commit_mode`
    plain = make_cache(make_config("scatter", dtype), device)  # the reference: one token at a time
    stream = None if device == "cpu" else torch.cuda.current_stream()
    slots = torch.tensor([2, 0, 3], dtype=torch.int32, device=device)  # row b lives in slot slots[b]
    prompt = torch.as_tensor(rng.integers(0, VOCAB, (3, 5)), device=device)
    for t in range(prompt.shape[1]):  # prefill both the same way
        decode_step(spec, weights, prompt[:, t], slots)
        decode_step(plain, weights, prompt[:, t], slots)
    for _ in range(rounds):
        drafts = torch.as_tensor(rng.integers(0, VOCAB, (3, verify_len)), device=device)
        # a row always accepts its first token (the verify window starts with the last emitted one)
        accept = torch.as_tensor(rng.integers(1, verify_len + 1, 3), dtype=torch.int32, device=device)
        verify(spec, weights, drafts, slots)
        commit(spec, accept, slots, stream)
        for t in range(verify_len):  # the same rows, one token at a time, each up to its accept length
            decode_step(plain, weights, drafts[:, t], slots, keep=accept > t)
    return pools_on_host(spec), pools_on_host(plain)


# --8<-- [end:check]


def main(argv: list | None = None) -> int:
    """Run :func:`check` in both commit modes on ``--device`` and print the largest difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    failed = False
    for mode in ("scatter", "replay"):
        spec, plain = check(args.device, mode)
        same = all(a.tobytes() == b.tobytes() for a, b in zip(spec, plain, strict=True))
        worst = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(spec, plain, strict=True))
        close = all(np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(spec, plain, strict=True))
        print(f"{args.device} {mode}: bit-identical {same}, largest difference {worst:.3g}")
        failed |= not close
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
