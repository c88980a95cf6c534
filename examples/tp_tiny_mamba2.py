"""Tensor parallelism: the tiny Mamba2 model sharded over ranks, one cache manager per rank.

Each rank keeps ``H / tp`` heads: its slice of the x channels of ``in_proj`` / conv / ``dt``, its
rows of ``out_proj``, and every B and C channel (one B/C group, so each rank needs all of them:
``Config.shard(tp, replicated_conv_channels=2 * N, rank=r)`` gives the rank's cache config,
``C_rank = H * D / tp + 2 * N``). Per layer and token::

    z_r      = rmsnorm(u) @ in_proj[:, cols_r]        cols_r = x of my heads, B, C, dt of my heads
    conv, h  : the rank's own slots of its own pools  [B, C_rank, K], [B, H / tp, D, N]
    partial_r = y_r @ out_proj[rows_r]                [n, M]
    u        = u + all_reduce(partial_r)              the only communication, once per layer

The residual stream ``u`` is replicated; so are the embedding and the (random, untied) greedy head.
Speculative decoding is the same on each rank: verify writes the rank's intermediate buffers,
every rank computes the same accept lengths from the same (all-reduced) ``u``, and each rank
commits with its own ``scatter_mtp_states``.

Against one device the tokens are the same and the states agree within a tolerance, not bit for
bit: unsharded, ``out_proj`` sums all ``H * D`` products in one order; sharded, each rank sums
its half and the all-reduce adds the halves, a different float32 rounding that later layers and
tokens carry along. ``RTOL`` / ``ATOL`` bound it (float32 states, a few dozen tokens).

Two ways to run it:

- ``run_simulated(seed, tp)``: every rank in this process on the NumPy backend, the all-reduce a
  sum in rank order (for two ranks the same float32 result as NCCL's). Runs anywhere.
- ``python examples/tp_tiny_mamba2.py``: two GPUs, one process each (``torch.multiprocessing``
  spawn, NCCL), the Numba backend and the model's own Numba kernels, ``all_reduce`` through
  ``torch.distributed`` on the library's device arrays (zero copy via ``__cuda_array_interface__``).
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
import tempfile
import warnings

import numpy as np

if __name__ == "__main__":  # run as a script from a checkout: import this checkout's mamba_cache
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.models.mamba2 import F32, TinyMamba2, matvec, rmsnorm, silu, softplus
from mamba_cache.replay.reference import mamba2_step

VERIFY_LEN = 4
RTOL, ATOL = 1e-4, 1e-5


def model_config(batch: int = 3, **overrides) -> Config:
    """The unsharded cache config: 2 layers, 4 heads of 4, state 4, float32 states, verify length 4."""
    fields = dict(
        num_recurrent_layers=2,
        max_batch_size=batch,
        recurrent_state_num_heads=4,
        recurrent_state_head_dim=4,
        recurrent_state_size=4,
        conv_dim=4 * 4 + 2 * 4,
        conv_kernel=4,
        max_intermediate_seq_len=VERIFY_LEN,
        recurrent_state_dtype="float32",
        conv_state_dtype="float32",
    )
    fields.update(overrides)
    return Config(**fields)


def rank_config(config: Config, tp: int, rank: int) -> Config:
    """Rank ``rank``'s cache config: heads and x channels split, the ``2 * N`` B/C channels on every rank."""
    return config.shard(tp, replicated_conv_channels=2 * config.recurrent_state_size, rank=rank)


def shard_weights(model: TinyMamba2, tp: int, rank: int) -> dict:
    """The slices of ``model.weights`` rank ``rank`` of ``tp`` keeps (copies, contiguous)."""
    config, w = model.config, model.weights
    heads, dim, state = config.recurrent_state_num_heads, config.recurrent_state_head_dim, config.recurrent_state_size
    width, per_rank = heads * dim, heads // tp
    my_heads = np.arange(rank * per_rank, (rank + 1) * per_rank)
    my_x = np.arange(rank * per_rank * dim, (rank + 1) * per_rank * dim)
    b_and_c = np.arange(width, width + 2 * state)
    conv_channels = np.concatenate([my_x, b_and_c])  # the rank's conv layout: [x of my heads | B | C]
    in_cols = np.concatenate([conv_channels, config.conv_dim + my_heads])  # then dt of my heads

    def take(array, index, axis):
        return np.ascontiguousarray(np.take(array, index, axis=axis))

    return {
        "embedding": w["embedding"],
        "in_proj": take(w["in_proj"], in_cols, 2),
        "conv_weight": take(w["conv_weight"], conv_channels, 1),
        "conv_bias": take(w["conv_bias"], conv_channels, 1),
        "dt_bias": take(w["dt_bias"], my_heads, 1),
        "a": take(w["a"], my_heads, 1),
        "d_skip": take(w["d_skip"], my_heads, 1),
        "out_proj": take(w["out_proj"], my_x, 1),
    }


def rank_model(model: TinyMamba2, tp: int, rank: int) -> TinyMamba2:
    """A TinyMamba2 of the rank's shape holding the rank's weights (its layer loop is not used)."""
    shell = TinyMamba2(rank_config(model.config, tp, rank), vocab_size=model.vocab_size)
    shell.weights = shard_weights(model, tp, rank)
    return shell


def lm_head(model: TinyMamba2, seed: int) -> np.ndarray:
    """A random ``[M, vocab]`` float32 output head (replicated on every rank).

    Not tied to the embedding: with a tied head this tiny model mostly repeats its input token,
    which would make "the same greedy tokens" a weak check.
    """
    width = model.weights["embedding"].shape[1]
    rng = np.random.default_rng([seed, 1])
    return (rng.standard_normal((width, model.vocab_size)) * width**-0.5).astype(F32)


def logits(head: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The greedy head: ``rmsnorm(u) @ head``, ``[n, M] -> [n, vocab]`` float32."""
    return matvec(rmsnorm(u), head)


# ---------------------------------------------------------------- one rank, NumPy
class NumpyRank:
    """One rank's weights and cache on the NumPy backend; `partial` is its share of a layer."""

    def __init__(self, model: TinyMamba2, tp: int, rank: int) -> None:
        self.shell = rank_model(model, tp, rank)
        self.cache = NumpyMambaCacheManager(self.shell.config)

    def partial(self, layer: int, u: np.ndarray, slots: np.ndarray, step: int | None) -> np.ndarray:
        """The rank's ``y_r @ out_proj_r`` ``[n, M]`` for ``u`` ``[n, M]``; its states update in place.

        The body of ``TinyMamba2``'s layer loop on the rank's slices, the residual add left to
        the caller (after the reduction).
        """
        w, config, cache = self.shell.weights, self.shell.config, self.cache
        heads, dim, state = (
            config.recurrent_state_num_heads,
            config.recurrent_state_head_dim,
            config.recurrent_state_size,
        )
        channels, width, rows = config.conv_dim, heads * dim, u.shape[0]
        z = matvec(rmsnorm(u), w["in_proj"][layer])  # [R, C_rank + H / tp]
        conv = cache.get_conv_state(layer)  # [B, C_rank, K]
        window = np.concatenate([conv[slots, :, 1:], z[:, :channels, None].astype(conv.dtype)], axis=2)
        conv[slots] = window
        xbc = silu((window.astype(F32) * w["conv_weight"][layer]).sum(axis=2, dtype=F32) + w["conv_bias"][layer])
        x = xbc[:, :width].reshape(rows, heads, dim)
        b_in, c_out = xbc[:, width : width + state], xbc[:, width + state :]
        dt = softplus(z[:, channels:] + w["dt_bias"][layer])  # [R, H / tp]
        decay = np.exp(dt * w["a"][layer])
        rec = cache.get_recurrent_state(layer)  # [B, H / tp, D, N]
        dtx = dt[:, :, None] * x  # [R, H / tp, D]
        h = mamba2_step(rec[slots].astype(F32), decay, dtx, b_in[:, None, :])  # the model's own update (G = 1)
        rec[slots] = h
        y = (h * c_out[:, None, None, :]).sum(axis=3, dtype=F32) + w["d_skip"][layer][None, :, None] * x
        if step is not None:
            cache.get_intermediate_conv_state(layer)[slots, step] = window
            cache.get_intermediate_recurrent_state(layer)[slots, step] = h
        return matvec(y.reshape(rows, width), w["out_proj"][layer])


# ---------------------------------------------------------------- engines: step(tokens) -> host u
class Unsharded:
    """The model on one device: ``TinyMamba2.decode_step`` on one manager (the reference)."""

    def __init__(self, model: TinyMamba2, cache, head: np.ndarray) -> None:
        self.model, self.managers, self.head = model, [cache], head

    def step(self, tokens, step: int | None = None) -> np.ndarray:
        """``[n, M]`` host output after one token per row (slots ``0 .. n-1``)."""
        u = self.model.decode_step(self.managers[0], tokens, step=step)
        return u if isinstance(u, np.ndarray) else u.copy_to_host()


class SimulatedTP:
    """``tp`` NumPy ranks in this process; the all-reduce is a sum in rank order."""

    def __init__(self, model: TinyMamba2, tp: int, head: np.ndarray) -> None:
        self.model, self.head = model, head
        self.ranks = [NumpyRank(model, tp, r) for r in range(tp)]
        self.managers = [r.cache for r in self.ranks]

    def step(self, tokens, step: int | None = None) -> np.ndarray:
        """``[n, M]`` output after one token per row; every rank's states advance."""
        tokens = np.asarray(tokens, dtype=np.int64)
        slots = np.arange(tokens.shape[0])
        u = self.model.weights["embedding"][tokens]
        for layer in range(self.model.config.num_recurrent_layers):
            partials = [rank.partial(layer, u, slots, step) for rank in self.ranks]
            u = u + functools.reduce(np.add, partials)
        return u


# ---------------------------------------------------------------- decoding, backend-neutral
def greedy(engine, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Plain greedy decoding: prefill ``prompt`` ``[B, T]`` token by token, then ``steps`` tokens."""
    for t in range(prompt.shape[1]):
        u = engine.step(prompt[:, t])
    out = [logits(engine.head, u).argmax(axis=1)]
    while len(out) < steps:
        out.append(logits(engine.head, engine.step(out[-1])).argmax(axis=1))
    return np.stack(out, axis=1)


def speculative(engine, prompt, oracle, steps: int, rng, verify_len: int = VERIFY_LEN, to_device=None):
    """Greedy speculative decoding: verify ``[last, V - 1 drafts]``, accept, scatter on every manager.

    The drafts are the ``oracle`` continuation ``[B, >= steps]`` with a deliberate error whose
    position cycles over rows and rounds from a random start (one slot of the cycle is no error:
    a full accept), so the accept lengths run from 1 to V.

    Returns:
        ``(tokens [B, steps], accept lengths per round)``.
    """
    batch = prompt.shape[0]
    for t in range(prompt.shape[1]):
        u = engine.step(prompt[:, t])
    last = logits(engine.head, u).argmax(axis=1)
    emitted, history = [[int(t)] for t in last], []
    vocab = engine.model.vocab_size
    # The error position cycles over rows and rounds from a random start: within two rounds of
    # three rows every accept length 1 .. V has come up.
    offset = int(rng.integers(0, verify_len))
    while min(len(row) for row in emitted) < steps:
        drafts = np.empty((batch, verify_len - 1), dtype=np.int64)
        for b in range(batch):
            start = len(emitted[b])
            drafts[b] = oracle[b, np.minimum(np.arange(start, start + verify_len - 1), oracle.shape[1] - 1)]
            wrong = (offset + len(history) + b) % verify_len  # == verify_len - 1: no error, a full accept
            if wrong < verify_len - 1:
                drafts[b, wrong] = (drafts[b, wrong] + 1) % vocab
        inputs = np.concatenate([last[:, None], drafts], axis=1)
        for manager in engine.managers:
            manager.reshape_intermediate_states(batch, verify_len)
        predicted = np.stack(
            [logits(engine.head, engine.step(inputs[:, t], step=t)).argmax(axis=1) for t in range(verify_len)], axis=1
        )
        accept = (1 + np.cumprod(drafts == predicted[:, :-1], axis=1).sum(axis=1)).astype(np.int32)
        for manager in engine.managers:
            manager.scatter_mtp_states(accept if to_device is None else to_device(accept))
        for b in range(batch):
            emitted[b].extend(int(t) for t in predicted[b, : accept[b]])
        last = predicted[np.arange(batch), accept - 1]
        history.append(accept.tolist())
    return np.array([row[:steps] for row in emitted]), history


def gather_states(rank_states: list, config: Config) -> tuple[list, list]:
    """Per layer, the unsharded ``(conv [B, C, K], recurrent [B, H, D, N])`` from each rank's pools.

    ``rank_states[r]`` is ``(conv layers, recurrent layers)`` of rank ``r``; the x channels are
    concatenated in rank order and the replicated B/C channels taken from rank 0.
    """
    state = config.recurrent_state_size
    conv, rec = [], []
    for layer in range(config.num_recurrent_layers):
        x_part = [states[0][layer][:, : -2 * state] for states in rank_states]
        conv.append(np.concatenate([*x_part, rank_states[0][0][layer][:, -2 * state :]], axis=1))
        rec.append(np.concatenate([states[1][layer] for states in rank_states], axis=1))
    return conv, rec


def _host_states(manager) -> tuple[list, list]:
    def host(a):
        return np.array(a) if isinstance(a, np.ndarray) else a.copy_to_host()

    layers = manager.get_config().num_recurrent_layers
    return [host(manager.get_conv_state(i)) for i in range(layers)], [
        host(manager.get_recurrent_state(i)) for i in range(layers)
    ]


def run_simulated(seed: int = 0, tp: int = 2, batch: int = 3, prompt_len: int = 5, steps: int = 16) -> dict:
    """Unsharded vs ``tp`` simulated ranks on the NumPy backend: greedy and speculative.

    Returns:
        A dict: ``reference`` / ``sharded`` / ``speculative`` tokens ``[B, steps]``, the unsharded
        and gathered sharded states after plain decoding (``reference_states``,
        ``sharded_states``: ``(conv layers, recurrent layers)``), ``accept_history``.
    """
    config = model_config(batch)
    model = TinyMamba2(config, seed=seed)
    head = lm_head(model, seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.vocab_size, size=(batch, prompt_len))
    reference_cache = NumpyMambaCacheManager(config)
    reference = greedy(Unsharded(model, reference_cache, head), prompt, steps + VERIFY_LEN)
    sharded_engine = SimulatedTP(model, tp, head)
    sharded = greedy(sharded_engine, prompt, steps + VERIFY_LEN)
    spec, history = speculative(SimulatedTP(model, tp, head), prompt, reference, steps, rng)
    return {
        "reference": reference[:, :steps],
        "sharded": sharded[:, :steps],
        "speculative": spec,
        "reference_states": _host_states(reference_cache),
        "sharded_states": gather_states([_host_states(m) for m in sharded_engine.managers], config),
        "accept_history": history,
    }


# ---------------------------------------------------------------- one rank per GPU (Numba + NCCL)
class NumbaRank:
    """One rank on its GPU: the model's Numba kernels on the rank's slices, ``all_reduce`` per layer."""

    def __init__(self, model: TinyMamba2, tp: int, rank: int, head: np.ndarray, reduce_add=None) -> None:
        from mamba_cache import NumbaMambaCacheManager
        from mamba_cache.models.mamba2_kernels import NumbaTinyMamba2

        self.model, self.head = model, head  # the full model's embedding and the head: replicated
        self.shell = rank_model(model, tp, rank)
        self.device = NumbaTinyMamba2(self.shell)  # uploads the rank's weights
        self.cache = NumbaMambaCacheManager(self.shell.config)
        self.managers = [self.cache]
        self.reduce_add = nccl_reduce_add if reduce_add is None else reduce_add

    def step(self, tokens, step: int | None = None) -> np.ndarray:
        """``[n, M]`` host output after one token per row, the partial sums all-reduced per layer."""
        with warnings.catch_warnings():  # tiny grids on purpose
            warnings.filterwarnings("ignore", message=".*Grid size .* will likely result in GPU under-utilization")
            return self._step(np.ascontiguousarray(tokens, dtype=np.int64), step)

    def _step(self, tokens: np.ndarray, step: int | None) -> np.ndarray:
        from numba import cuda

        from mamba_cache.models import mamba2_kernels as k
        from mamba_cache.precision.kernels import store_formats

        config, w, cache = self.shell.config, self.device.weights, self.cache
        n, heads = tokens.shape[0], config.recurrent_state_num_heads
        width, channels = heads * config.recurrent_state_head_dim, config.conv_dim
        model_width = self.model.weights["embedding"].shape[1]
        d_tokens, d_slots = cuda.to_device(tokens), cuda.to_device(np.arange(n, dtype=np.int64))
        # every row's position 0: only stochastic rounding reads it, and this example's states are float32
        d_positions = cuda.to_device(np.zeros(n, dtype=np.int32))
        seed_lo, seed_hi = config.rounding_seed & 0xFFFFFFFF, config.rounding_seed >> 32
        conv_fmt = cuda.to_device(store_formats(config, config.conv_state_dtype, config.intermediate_conv_state_dtype))
        rec_fmt = cuda.to_device(
            store_formats(config, config.recurrent_state_dtype, config.intermediate_recurrent_state_dtype)
        )
        u = cuda.device_array((n, model_width), dtype=np.float32)
        normed = cuda.device_array((n, model_width), dtype=np.float32)
        z = cuda.device_array((n, channels + heads), dtype=np.float32)
        xbc = cuda.device_array((n, channels), dtype=np.float32)
        y = cuda.device_array((n, width), dtype=np.float32)
        partial = cuda.device_array((n, model_width), dtype=np.float32)
        grid, threads = k._grid(n, model_width)
        k.embed[grid, threads](d_tokens, w["embedding"], u)
        for layer in range(config.num_recurrent_layers):
            k.rmsnorm[-(-n // 32), 32](u, normed)
            grid, threads = k._grid(n, z.shape[1])
            k.matvec[grid, threads](normed, w["in_proj"][layer], z, False)
            conv, rec = cache.get_conv_state(layer), cache.get_recurrent_state(layer)
            inter_conv = (
                cache.get_intermediate_conv_state(layer) if step is not None else conv.reshape((1, *conv.shape))
            )
            inter_rec = (
                cache.get_intermediate_recurrent_state(layer) if step is not None else rec.reshape((1, *rec.shape))
            )
            at = -1 if step is None else step
            # no replay stash here (scatter commit): stash step -1, placeholders of the right rank, never touched
            stash_col = conv  # [B, C_rank, K] stands for [active, V, C_rank]
            stash_da, stash_u, stash_b = (
                z.reshape((n, z.shape[1], 1)),
                y.reshape((n, 1, 1, width)),
                y.reshape((n, 1, 1, width)),
            )
            grid, threads = k._grid(n, channels)
            k.conv_step[grid, threads](
                conv,
                z,
                w["conv_weight"][layer],
                w["conv_bias"][layer],
                d_slots,
                xbc,
                inter_conv,
                at,
                stash_col,
                -1,
                d_positions,
                conv_fmt,
                layer,
                seed_lo,
                seed_hi,
            )
            grid, threads = k._grid(n, width)
            k.ssm_step[grid, threads](
                rec,
                xbc,
                z,
                w["dt_bias"][layer],
                w["a"][layer],
                w["d_skip"][layer],
                d_slots,
                y,
                inter_rec,
                at,
                stash_da,
                stash_u,
                stash_b,
                -1,
                d_positions,
                rec_fmt,
                layer,
                seed_lo,
                seed_hi,
            )
            grid, threads = k._grid(n, model_width)
            k.matvec[grid, threads](y, w["out_proj"][layer], partial, False)
            self.reduce_add(u, partial)
        return u.copy_to_host()


def nccl_reduce_add(u, partial) -> None:
    """``u += all_reduce(partial)`` on the device, through torch.distributed (NCCL), zero copy.

    ``u`` and ``partial`` are ``[n, M]`` float32 Numba device arrays; torch wraps them through
    ``__cuda_array_interface__``. Numba and torch both launch on the legacy default stream, so the
    kernels before and after are ordered without a synchronisation.
    """
    import torch
    import torch.distributed as dist

    partial_t = torch.as_tensor(partial, device="cuda")
    dist.all_reduce(partial_t)
    torch.as_tensor(u, device="cuda").add_(partial_t)


def _worker(rank: int, tp: int, port: int, seed: int, outdir: str, batch: int, prompt_len: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from numba import cuda

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast: plain ring/tree all-reduce
    torch.cuda.set_device(rank)
    cuda.select_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=tp, rank=rank)
    try:
        config = model_config(batch)
        model = TinyMamba2(config, seed=seed)
        head = lm_head(model, seed)
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, model.vocab_size, size=(batch, prompt_len))
        oracle = np.load(os.path.join(outdir, "reference.npy"))
        plain = NumbaRank(model, tp, rank, head)
        tokens = greedy(plain, prompt, steps + VERIFY_LEN)
        spec_engine = NumbaRank(model, tp, rank, head)
        spec, history = speculative(spec_engine, prompt, oracle, steps, rng, to_device=cuda.to_device)
        conv, rec = _host_states(plain.cache)
        np.savez(
            os.path.join(outdir, f"rank{rank}.npz"),
            tokens=tokens[:, :steps],
            speculative=spec,
            accept=np.array(history),
            **{f"conv{i}": a for i, a in enumerate(conv)},
            **{f"rec{i}": a for i, a in enumerate(rec)},
        )
    finally:
        dist.destroy_process_group()


def run_distributed(seed: int = 0, tp: int = 2, batch: int = 3, prompt_len: int = 5, steps: int = 16) -> dict:
    """One GPU reference (Numba backend, GPU 0), then ``tp`` spawned ranks over NCCL; the evidence.

    Returns:
        The dict of `run_simulated`, plus ``rank_tokens`` (every rank's greedy tokens).
    """
    import torch.multiprocessing as mp

    from mamba_cache import NumbaMambaCacheManager

    config = model_config(batch)
    model = TinyMamba2(config, seed=seed)
    head = lm_head(model, seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.vocab_size, size=(batch, prompt_len))
    reference_cache = NumbaMambaCacheManager(config)
    reference = greedy(Unsharded(model, reference_cache, head), prompt, steps + VERIFY_LEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        np.save(os.path.join(outdir, "reference.npy"), reference)
        mp.spawn(_worker, args=(tp, port, seed, outdir, batch, prompt_len, steps), nprocs=tp, join=True)
        ranks = [dict(np.load(os.path.join(outdir, f"rank{r}.npz"))) for r in range(tp)]
    layers = config.num_recurrent_layers
    rank_states = [([r[f"conv{i}"] for i in range(layers)], [r[f"rec{i}"] for i in range(layers)]) for r in ranks]
    return {
        "reference": reference[:, :steps],
        "sharded": ranks[0]["tokens"],
        "rank_tokens": [r["tokens"] for r in ranks] + [r["speculative"] for r in ranks],
        "speculative": ranks[0]["speculative"],
        "reference_states": _host_states(reference_cache),
        "sharded_states": gather_states(rank_states, config),
        "accept_history": ranks[0]["accept"].tolist(),
    }


def check(result: dict) -> float:
    """Raise AssertionError unless tokens match exactly and states within RTOL / ATOL; the max |diff|."""
    assert np.array_equal(result["sharded"], result["reference"]), "sharded greedy tokens differ"
    assert np.array_equal(result["speculative"], result["reference"]), "sharded speculative tokens differ"
    for other in result.get("rank_tokens", []):
        assert np.array_equal(other, result["reference"]), "the ranks disagree"
    worst = 0.0
    for want, got in zip(sum(result["reference_states"], []), sum(result["sharded_states"], []), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def main() -> None:
    """Command line: ``--simulate`` (NumPy, one process) or the default, one process per GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true", help="NumPy ranks in one process (no GPU)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run_simulated(args.seed, args.tp) if args.simulate else run_distributed(args.seed, args.tp)
    worst = check(result)
    print("tokens (one device = sharded = speculative):", result["reference"].tolist())
    print("accept lengths per round:", result["accept_history"])
    print(f"max |state difference| vs one device: {worst:.3g} (rtol {RTOL}, atol {ATOL})")
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
