"""Disaggregated prefill / decode on one machine: gloo processes hand request states across TP sizes.

Prefill runs on ``TP_p`` processes, decode on ``TP_d`` others (the tiny Mamba2 with four B/C groups,
or the tiny Gated DeltaNet with four key heads; NumPy backend, float32 states). The prefill ranks
run the prompts, export their slots (``export_slots(dest_tp_size=TP_d)``), send each decode rank
its piece (``send_parcel``, gloo); each decode rank receives every prefill rank's piece
(``recv_parcel``), imports it into other slots (``import_slots``) and the decode group decodes
greedily, its partial sums all-reduced per layer (as ``examples/tp_tiny_mamba2.py`` does, now for
any number of groups and for Gated DeltaNet: each rank's weights are cut with the cache's own
``Config.conv_sections``). The same requests decoded in one process give the reference.

What holds (``check``): the states a decode rank imported are bit for bit the prefill ranks' states
cut to its heads; the tokens equal the one-process tokens; the final states agree within the TP
example's tolerance (a sharded ``out_proj`` sums in another order).

Run: ``python examples/disaggregated_gloo.py --prefill-tp 1 --decode-tp 2 --mixer gdn`` (CPU only).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import numpy as np

if __name__ == "__main__":  # run as a script from a checkout: import this checkout's mamba_cache
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.models.gdn import TinyGatedDeltaNet, l2norm
from mamba_cache.models.mamba2 import F32, TinyMamba2, matvec, rmsnorm, silu, softplus
from mamba_cache.replay.reference import gdn_step, mamba2_step

RTOL, ATOL = 1e-4, 1e-5  # the TP example's tolerance for states (reductions reorder)
BATCH, PROMPT, STEPS = 3, 5, 8


def model_config(mixer: str, batch: int = BATCH) -> Config:
    """The unsharded config: 2 layers, 8 heads, dims 4, four groups (B/C groups or key heads), float32."""
    heads, dim, size, groups = 8, 4, 4, 4
    conv = heads * dim + 2 * groups * size if mixer == "mamba2" else 2 * groups * dim + heads * size
    return Config(
        num_recurrent_layers=2, max_batch_size=batch, recurrent_state_num_heads=heads, recurrent_state_head_dim=dim,
        recurrent_state_size=size, conv_dim=conv, conv_kernel=4, recurrent_state_dtype="float32",
        conv_state_dtype="float32", mixer=mixer, n_groups=groups,
    )  # fmt: skip


def build_model(mixer: str, seed: int):
    """The unsharded tiny model of ``mixer`` with weights from ``seed``."""
    cls = TinyMamba2 if mixer == "mamba2" else TinyGatedDeltaNet
    return cls(model_config(mixer), seed=seed)


def lm_head(model, seed: int) -> np.ndarray:
    """A random ``[M, vocab]`` float32 greedy head, replicated on every rank."""
    width = model.weights["embedding"].shape[1]
    return (np.random.default_rng([seed, 1]).standard_normal((width, model.vocab_size)) * width**-0.5).astype(F32)


def shard(config: Config, tp: int, rank: int) -> Config:
    """Rank ``rank`` of ``tp``'s cache config."""
    return config.shard(tp, rank=rank)  # four groups: TP 1, 2 and 4 split them


# ---------------------------------------------------------------- one TP rank of either model, NumPy
class Rank:
    """Rank ``rank`` of ``tp``: its weights (cut by the cache's conv sections) and its cache."""

    def __init__(self, model, tp: int, rank: int) -> None:
        whole = model.config
        self.model, self.config = model, shard(whole, tp, rank)
        self.cache = NumpyMambaCacheManager(self.config)
        offsets = {s.name: s.offset for s in whole.conv_sections}
        channels = np.concatenate(
            [offsets[s.name] + s.start + np.arange(s.channels) for s in self.config.conv_sections]
        )
        h0, h1 = self.config.head_range
        heads = np.arange(h0, h1)
        feature = whole.recurrent_state_head_dim if whole.mixer == "mamba2" else whole.recurrent_state_size
        gates = [whole.conv_dim + heads] + (
            [] if whole.mixer == "mamba2" else [whole.conv_dim + whole.unsharded_num_heads + heads]
        )
        w = model.weights
        take = lambda a, i, axis: np.ascontiguousarray(np.take(a, i, axis=axis))  # noqa: E731
        self.w = {
            "in_proj": take(w["in_proj"], np.concatenate([channels, *gates]), 2),
            "conv_weight": take(w["conv_weight"], channels, 1),
            "conv_bias": take(w["conv_bias"], channels, 1),
            "dt_bias": take(w["dt_bias"], heads, 1),
            "a": take(w["a"], heads, 1),
            "out_proj": take(w["out_proj"], np.arange(h0 * feature, h1 * feature), 1),
        }
        if "d_skip" in w:
            self.w["d_skip"] = take(w["d_skip"], heads, 1)

    def partial(self, layer: int, u: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """This rank's share ``[n, M]`` of layer ``layer``'s output for ``u``; its states advance in place."""
        w, c, cache = self.w, self.config, self.cache
        heads, dim, size, groups = (
            c.recurrent_state_num_heads,
            c.recurrent_state_head_dim,
            c.recurrent_state_size,
            c.n_groups,
        )
        channels, n = c.conv_dim, u.shape[0]
        z = matvec(rmsnorm(u), w["in_proj"][layer])
        conv = cache.get_conv_state(layer)
        window = np.concatenate([conv[slots, :, 1:], z[:, :channels, None].astype(conv.dtype)], axis=2)
        conv[slots] = window
        act = silu((window.astype(F32) * w["conv_weight"][layer]).sum(axis=2, dtype=F32) + w["conv_bias"][layer])
        rec = cache.get_recurrent_state(layer)
        if c.mixer == "mamba2":
            width = heads * dim
            x = act[:, :width].reshape(n, heads, dim)
            b_in = act[:, width : width + groups * size].reshape(n, groups, size)
            c_out = act[:, width + groups * size :].reshape(n, groups, size)
            dt = softplus(z[:, channels:] + w["dt_bias"][layer])
            dtx = dt[:, :, None] * x
            h = mamba2_step(rec[slots].astype(F32), np.exp(dt * w["a"][layer]), dtx, b_in)
            rec[slots] = h
            c_heads = np.repeat(c_out, heads // groups, axis=1)
            y = (h * c_heads[:, :, None, :]).sum(axis=3, dtype=F32) + w["d_skip"][layer][None, :, None] * x
            return matvec(y.reshape(n, width), w["out_proj"][layer])
        keys = groups * dim
        q = l2norm(act[:, :keys].reshape(n, groups, dim))
        k = l2norm(act[:, keys : 2 * keys].reshape(n, groups, dim))
        v = act[:, 2 * keys :].reshape(n, heads, size)
        g = np.exp(w["a"][layer] * softplus(z[:, channels : channels + heads] + w["dt_bias"][layer]))
        beta = F32(1) / (F32(1) + np.exp(-z[:, channels + heads :]))
        state = gdn_step(rec[slots].astype(F32), g, beta, k, v)
        rec[slots] = state
        o = (state * np.repeat(q, heads // groups, axis=1)[..., None]).sum(axis=2, dtype=F32)
        return matvec(o.reshape(n, heads * size), w["out_proj"][layer])


def step(rank: Rank, tokens: np.ndarray, slots: np.ndarray, reduce) -> np.ndarray:
    """One token per row through every layer; ``reduce`` sums the ranks' partials (the all-reduce)."""
    u = rank.model.weights["embedding"][np.asarray(tokens, dtype=np.int64)]
    for layer in range(rank.config.num_recurrent_layers):
        u = u + reduce(rank.partial(layer, u, slots))
    return u


def greedy_logits(head: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The greedy tokens ``[n]`` of outputs ``u`` ``[n, M]``."""
    return matvec(rmsnorm(u), head).argmax(axis=1)


def decode(rank: Rank, head, first, slots, steps: int, reduce) -> np.ndarray:
    """``steps`` greedy tokens per row starting from ``first`` (the token the prefill produced)."""
    out, last = [first], first
    while len(out) < steps:
        last = greedy_logits(head, step(rank, last, slots, reduce))
        out.append(last)
    return np.stack(out, axis=1)


# ---------------------------------------------------------------- the reference: one process
def one_process(mixer: str, seed: int, prompt: np.ndarray, steps: int = STEPS) -> tuple:
    """Prefill and decode in one process on the unsharded model: ``(tokens, (recurrent, conv) after)``."""
    model = build_model(mixer, seed)
    rank = Rank(model, 1, 0)
    slots = np.arange(prompt.shape[0])
    for t in range(prompt.shape[1]):
        u = step(rank, prompt[:, t], slots, lambda p: p)
    tokens = decode(rank, lm_head(model, seed), greedy_logits(lm_head(model, seed), u), slots, steps, lambda p: p)
    return tokens, (rank.cache.pools.recurrent.copy(), rank.cache.pools.conv.copy())


# ---------------------------------------------------------------- processes
def free_port() -> int:
    """A free TCP port on localhost (the gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def handoff(rank: int, prefill: list, decode_ranks: list, mixer: str, seed: int, prompt, dst_slots, outdir: str):
    """One hand-off, run by every process of the world; the prefill and decode groups are the caller's."""
    import torch
    import torch.distributed as dist

    from mamba_cache.moving.transport import recv_parcel, send_parcel

    model = build_model(mixer, seed)
    head = lm_head(model, seed)
    whole = model.config
    n = prompt.shape[0]
    src_slots = np.arange(n, dtype=np.int32)
    groups = {tuple(prefill): dist.new_group(prefill), tuple(decode_ranks): dist.new_group(decode_ranks)}

    def reduce_in(group):
        def reduce(partial):
            tensor = torch.from_numpy(np.ascontiguousarray(partial))
            dist.all_reduce(tensor, group=group)
            return tensor.numpy()

        return reduce

    if rank in prefill:
        me = Rank(model, len(prefill), prefill.index(rank))
        reduce = reduce_in(groups[tuple(prefill)])
        for t in range(prompt.shape[1]):
            u = step(me, prompt[:, t], src_slots.astype(np.int64), reduce)
        parcel = me.cache.export_slots(
            src_slots, positions=np.full(n, prompt.shape[1], np.int64), dest_tp_size=len(decode_ranks), namespace=mixer
        )
        for descriptor, _ in parcel.pieces:
            send_parcel(parcel.for_rank(descriptor.dest_rank), decode_ranks[descriptor.dest_rank])
        if rank == prefill[0]:  # the first token, from the prefill's output (every prefill rank has it)
            dist.send(torch.from_numpy(greedy_logits(head, u).astype(np.int64)), decode_ranks[0])
            np.savez(os.path.join(outdir, f"{mixer}-prefill.npz"), u=u)
        for r in range(len(prefill)):  # the prefill states, for the exactness check
            if prefill.index(rank) == r:
                np.savez(
                    os.path.join(outdir, f"{mixer}-prefill-rank{r}.npz"),
                    recurrent=me.cache.pools.recurrent,
                    conv=me.cache.pools.conv,
                )
        return
    if rank not in decode_ranks:
        return
    me = Rank(model, len(decode_ranks), decode_ranks.index(rank))
    h0, h1 = me.config.head_range
    for r, src in enumerate(prefill):  # every prefill rank that shares heads with this one sends a piece
        p0, p1 = shard(whole, len(prefill), r).head_range
        if max(h0, p0) < min(h1, p1):
            parcel = recv_parcel(src, timeout=60)
            me.cache.import_slots(parcel, np.asarray(dst_slots, np.int32), namespace=mixer)
    imported = (me.cache.pools.recurrent.copy(), me.cache.pools.conv.copy())
    first = torch.empty(n, dtype=torch.int64)
    if rank == decode_ranks[0]:
        dist.recv(first, prefill[0])
    dist.broadcast(first, decode_ranks[0], group=groups[tuple(decode_ranks)])
    slots = np.asarray(dst_slots, np.int64)
    tokens = decode(me, head, first.numpy(), slots, STEPS, reduce_in(groups[tuple(decode_ranks)]))
    np.savez(
        os.path.join(outdir, f"{mixer}-decode-rank{decode_ranks.index(rank)}.npz"),
        tokens=tokens,
        imported_recurrent=imported[0],
        imported_conv=imported[1],
        recurrent=me.cache.pools.recurrent,
        conv=me.cache.pools.conv,
    )


def _world(rank: int, world: int, port: int, plan: list, outdir: str, seed: int, after=None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    rng = np.random.default_rng(seed)
    for prefill, decode_ranks, mixer in plan:
        prompt = rng.integers(0, 64, size=(BATCH, PROMPT))
        dst_slots = rng.permutation(BATCH).astype(np.int32)
        where = os.path.join(outdir, _tag(prefill, decode_ranks))
        handoff(rank, prefill, decode_ranks, mixer, seed, prompt, dst_slots, where)
        if rank == 0:
            np.save(os.path.join(where, f"{mixer}-plan.npy"), np.concatenate([prompt.ravel(), dst_slots]))
    if after is not None:  # more checks on the same processes (the tests' fault cases)
        after(rank, world, outdir)
    dist.barrier()
    dist.destroy_process_group()


def _tag(prefill, decode_ranks) -> str:
    return f"tp{len(prefill)}-to-tp{len(decode_ranks)}"


def run(plan: list, world: int, outdir: str, seed: int = 0, after=None) -> None:
    """Spawn ``world`` gloo processes running every hand-off of ``plan`` = [(prefill ranks, decode ranks, mixer)].

    ``after(rank, world, outdir)``, a picklable function, runs on every process once the plan is done
    (in its process group), so more checks share the processes' start-up.
    """
    import torch.multiprocessing as mp

    for prefill, decode_ranks, _ in plan:
        os.makedirs(os.path.join(outdir, _tag(prefill, decode_ranks)), exist_ok=True)
    mp.spawn(_world, args=(world, free_port(), plan, outdir, seed, after), nprocs=world, join=True)


def check(outdir: str, prefill_tp: int, decode_tp: int, mixer: str, seed: int = 0) -> dict:
    """The hand-off's evidence against one process; raises AssertionError if any claim fails."""
    where = os.path.join(outdir, f"tp{prefill_tp}-to-tp{decode_tp}")
    plan = np.load(os.path.join(where, f"{mixer}-plan.npy"))
    prompt, dst_slots = plan[: BATCH * PROMPT].reshape(BATCH, PROMPT), plan[BATCH * PROMPT :]
    tokens, (rec, conv) = one_process(mixer, seed, prompt)
    whole = model_config(mixer)
    prefill_parts = [np.load(os.path.join(where, f"{mixer}-prefill-rank{r}.npz")) for r in range(prefill_tp)]
    prefill_rec = np.concatenate([p["recurrent"] for p in prefill_parts], axis=2)
    prefill_conv = gather_conv(whole, [p["conv"] for p in prefill_parts])
    decoded = [np.load(os.path.join(where, f"{mixer}-decode-rank{r}.npz")) for r in range(decode_tp)]
    for r, got in enumerate(decoded):
        assert np.array_equal(got["tokens"], tokens), (mixer, r, got["tokens"], tokens)
        h0, h1 = shard(whole, decode_tp, r).head_range
        # exact: the imported state is the prefill ranks' state, cut to this rank's heads, in the named slots
        assert (
            got["imported_recurrent"][:, dst_slots].tobytes()
            == np.ascontiguousarray(prefill_rec[:, :, h0:h1]).tobytes()
        )
        want_conv = cut_conv(whole, prefill_conv, shard(whole, decode_tp, r))
        assert got["imported_conv"][:, dst_slots].tobytes() == want_conv.tobytes()
        np.testing.assert_allclose(got["recurrent"][:, dst_slots], rec[:, :, h0:h1], rtol=RTOL, atol=ATOL)
    return {"tokens": tokens, "decoded": [d["tokens"] for d in decoded]}


def gather_conv(whole: Config, parts: list) -> np.ndarray:
    """The unsharded conv states ``[L, B, C, K]`` from every rank's ``[L, B, C_rank, K]`` (sections in rank order)."""
    tp = len(parts)
    names = [s.name for s in whole.conv_sections]
    pieces = []
    for i in range(len(names)):
        for r, part in enumerate(parts):
            s = shard(whole, tp, r).conv_sections[i]
            pieces.append(part[:, :, s.offset : s.offset + s.channels])
    return np.concatenate(pieces, axis=2)


def cut_conv(whole: Config, conv: np.ndarray, rank_config: Config) -> np.ndarray:
    """A rank's conv channels ``[L, B, C_rank, K]`` of unsharded ``conv``."""
    offsets = {s.name: s.offset for s in whole.conv_sections}
    channels = np.concatenate([offsets[s.name] + s.start + np.arange(s.channels) for s in rank_config.conv_sections])
    return np.ascontiguousarray(conv[:, :, channels])


def main() -> None:
    """Run one hand-off and print its evidence."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-tp", type=int, default=1)
    parser.add_argument("--decode-tp", type=int, default=2)
    parser.add_argument("--mixer", choices=["mamba2", "gdn"], default="mamba2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prefill = list(range(args.prefill_tp))
    decode_ranks = list(range(args.prefill_tp, args.prefill_tp + args.decode_tp))
    with tempfile.TemporaryDirectory() as outdir:
        run([(prefill, decode_ranks, args.mixer)], args.prefill_tp + args.decode_tp, outdir, args.seed)
        result = check(outdir, args.prefill_tp, args.decode_tp, args.mixer, args.seed)
    print(f"{args.mixer}: prefill TP={args.prefill_tp} -> decode TP={args.decode_tp}, {BATCH} requests")
    print("one process:", result["tokens"].tolist())
    print("decode ranks:", result["decoded"][0].tolist())
    print("tokens equal, imported states exact, final states within", (RTOL, ATOL))


if __name__ == "__main__":
    main()
