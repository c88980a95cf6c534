"""A multi-turn chat workload against the prefix-state store: hit tokens per store size.

    python benchmarks/prefix_workload.py [--seed N] [--conversations 200] [--sizes 4,16,64,256]
                                         [--out benchmarks/results]

Runs on the CPU in seconds (NumPy backend, tiny states): the hit statistics depend only on the
keys, the LRU and the protocol, not on the state sizes. It drives a real
`PrefixStateCache` through the calls an engine makes:

- a workload of ``--conversations`` conversations over ``--system-prompts`` shared system prompts
  (Zipf-ish popularity), each of several turns; turn ``k``'s prompt is the system prompt plus every
  earlier user message and reply plus the new user message, so every prompt is a prefix of its
  conversation's token stream. ``--concurrency`` conversations are open at once and take turns in
  random order, so other conversations' checkpoints compete for the entries between turns;
- per turn (one request, slot 0): ``match`` the prompt, ``restore`` the hit, "prefill" the rest and
  ``insert`` checkpoints at block boundaries (policy ``last``: the prompt's last boundary, as SGLang
  keeps one state per request; ``every``: each boundary, as vLLM's all-blocks mode), then decode the
  reply in verify windows of ``--window`` draft steps with random accepted lengths, tracking each
  boundary a window may cross with ``reserve`` / ``scatter_mtp_states(track_entries=...)`` /
  ``publish`` or ``release``;
- the "model state" after ``n`` tokens of a stream is 16 bytes naming that exact prefix, so every
  restore is checked to bring back the state of the matched prefix (a wrong entry fails the run).

For each policy and store size ``P`` it reports the hit-token ratio against an unbounded store
(the same workload with ``P`` large enough never to evict: the upper bound, ratio 1 by
definition), the hit rate, and the prefill tokens saved (counted by the simulation's own prefill,
and checked equal to the store's ``hit_tokens``). Prints the seed and a table; writes
``<out>/prefix_workload-<date>.json`` (records with op ``prefix_workload``).

``--families chat,agentic,fewshot`` runs the second part instead: the three trace families of
[`benchmarks/prefix_traces.py`](prefix_traces.py) (shapes, FLOP and TTFT models documented there) against
stores of every placement and policy, at block sizes 64 and 528 and store sizes from 1 entry to ample.
Each request: ``match`` its prompt, ``restore`` the hit (checked: the restored bytes name the matched
prefix's owner and length), then ``insert`` at the store's ``positions`` of the prompt (during prefill)
and of the whole request (after decode; the last sampled token never counts). It drives the real
``PrefixStateCache`` on the NumPy backend with 16-byte states; the only shortcut is that the
block-digest chain of each stream is memoised (the same digests, not recomputed for every insert of a
prefix of that stream). Also times ``match`` of a 32k-token prompt, off-grid vs grid-only (same run);
``--match-only`` times only that (``<out>/prefix_match-<date>.json`` and ``.txt``).
Writes ``<out>/prefix_families-<date>.json`` and ``<out>/prefix_families-<date>.svg``; prints the table and
whether each of the issue's targets is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import prefix_families  # noqa: E402
from benchmarks.prefix_traces import interleave  # noqa: E402
from mamba_cache import Config, NumpyMambaCacheManager  # noqa: E402
from mamba_cache.prefix import PrefixStateCache  # noqa: E402

POLICIES = ("last", "every")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Parameters of the simulated traffic (defaults: the documented run)."""

    seed: int = 0
    system_prompts: int = 4
    conversations: int = 200
    concurrency: int = 16
    block_size: int = 256
    window: int = 4  #: verify window (draft steps per decode step); <= block_size
    zipf: float = 1.1  #: popularity of system prompt i is proportional to 1 / (i + 1) ** zipf
    system_tokens: tuple = (600, 3000)  #: uniform range of a system prompt's length
    turns: tuple = (2, 8)  #: uniform range of turns per conversation
    user_tokens: tuple = (20, 400)
    reply_tokens: tuple = (50, 600)


@dataclasses.dataclass
class Turn:
    conversation: int
    start: int  #: stream tokens consumed before this turn's user message
    prompt: int  #: tokens of the prompt (a prefix of the stream)
    end: int  #: tokens after the reply


@dataclasses.dataclass
class Stream:
    """One conversation's token stream; prefixes up to ``shared`` are its system prompt's."""

    tokens: np.ndarray
    system: int  #: which system prompt
    shared: int  #: its length


def build(w: Workload) -> tuple[list[Stream], list[Turn]]:
    """The conversations' streams and the interleaved order of their turns (all from ``w.seed``)."""
    rng = np.random.default_rng(w.seed)
    lo, hi = w.system_tokens
    systems = [
        rng.integers(0, 50_000, size=int(rng.integers(lo, hi + 1)), dtype=np.int32) for _ in range(w.system_prompts)
    ]
    popularity = 1.0 / np.arange(1, w.system_prompts + 1) ** w.zipf
    popularity /= popularity.sum()
    streams, plans = [], []
    for c in range(w.conversations):
        s = int(rng.choice(w.system_prompts, p=popularity))
        parts, turns, at = [systems[s]], [], systems[s].size
        for _ in range(int(rng.integers(w.turns[0], w.turns[1] + 1))):
            user = int(rng.integers(w.user_tokens[0], w.user_tokens[1] + 1))
            reply = int(rng.integers(w.reply_tokens[0], w.reply_tokens[1] + 1))
            parts.append(rng.integers(0, 50_000, size=user + reply, dtype=np.int32))
            turns.append(Turn(c, at, at + user, at + user + reply))
            at += user + reply
        streams.append(Stream(np.concatenate(parts), s, systems[s].size))
        plans.append(turns)
    return streams, interleave(rng, plans, w.concurrency)


def state_bytes(stream: Stream, conversation: int, n: int) -> np.ndarray:
    """The 16-byte "state" after the first ``n`` tokens: names the prefix (shared within a system prompt)."""
    owner = (1, stream.system) if n <= stream.shared else (2, conversation)
    return np.array([*owner, n, 0x5EED], dtype=np.uint32).view(np.uint8)


class Simulator:
    """One store of ``entries`` entries (policy ``policy``) run over a workload."""

    def __init__(self, w: Workload, streams: list[Stream], entries: int, policy: str, seed: int) -> None:
        config = Config(
            num_recurrent_layers=1,
            max_batch_size=1,
            recurrent_state_num_heads=1,
            recurrent_state_head_dim=1,
            recurrent_state_size=4,  # 4 float32: the 16 bytes of state_bytes
            recurrent_state_dtype="float32",
            conv_dim=1,
            conv_kernel=1,
            conv_state_dtype="float32",
            max_intermediate_seq_len=w.window,
            verify_writes_main_pool=False,  # every accepted length commits (a full accept too)
        )
        self.w, self.streams, self.policy = w, streams, policy
        self.manager = NumpyMambaCacheManager(config)
        self.store = PrefixStateCache(self.manager, entries=entries, block_size=w.block_size)
        self.rng = np.random.default_rng(seed)  # accepted lengths: the same for every store size
        self.manager.reshape_intermediate_states(1, w.window)
        self.main = self.manager.get_recurrent_state(0)[0].reshape(-1).view(np.uint8)
        self.inter = self.manager.get_intermediate_recurrent_state(0)[0].reshape(w.window, -1).view(np.uint8)
        self.prompt_tokens = self.prefilled = self.tracked = 0

    def set_state(self, turn: Turn, n: int) -> None:
        self.main[:] = state_bytes(self.streams[turn.conversation], turn.conversation, n)

    def run_turn(self, turn: Turn) -> None:
        tokens, bs, store = self.streams[turn.conversation].tokens, self.w.block_size, self.store
        prompt = tokens[: turn.prompt]
        self.prompt_tokens += turn.prompt
        handle = store.match(prompt)
        hit = 0
        if handle is not None:
            store.restore(handle, slot=0)
            hit = handle.length
            want = state_bytes(self.streams[turn.conversation], turn.conversation, hit)
            if self.main.tobytes() != want.tobytes():
                raise AssertionError(f"restored a wrong state for a {hit}-token prefix")
        self.prefilled += turn.prompt - hit
        boundaries = range((hit // bs + 1) * bs, turn.prompt + 1, bs)
        for b in boundaries if self.policy == "every" else boundaries[-1:]:
            self.set_state(turn, b)  # the prefill reached boundary b
            store.insert(tokens[:b], slot=0)
        self.decode(turn)

    def decode(self, turn: Turn) -> None:
        """Verify windows over the reply; only windows that may cross a boundary touch the store."""
        tokens, bs, window, store = self.streams[turn.conversation].tokens, self.w.block_size, self.w.window, self.store
        # accepted lengths for the whole reply at once (each >= 1, so reply-many always suffice)
        accepts = self.rng.integers(1, window + 1, size=turn.end - turn.prompt)
        starts = turn.prompt + np.concatenate(([0], np.cumsum(accepts)[:-1]))
        keep = starts < turn.end
        starts, accepts = starts[keep], np.minimum(accepts[keep], turn.end - starts[keep])
        boundaries = (starts // bs + 1) * bs
        for i in np.flatnonzero(boundaries <= np.minimum(starts + window, turn.end)).tolist():
            p, accept, boundary = int(starts[i]), int(accepts[i]), int(boundaries[i])
            step = boundary - p - 1  # the draft step whose state is the boundary's
            entry = store.reserve()
            for t in range(window):
                self.inter[t] = state_bytes(self.streams[turn.conversation], turn.conversation, p + t + 1)
            track = np.array([-1 if entry is None else entry], np.int32)
            self.manager.scatter_mtp_states(
                np.array([accept], np.int32), store=store, track_entries=track, track_steps=np.array([step], np.int32)
            )
            if entry is not None:
                if accept > step:
                    store.publish(entry, tokens[:boundary])
                    self.tracked += 1
                else:
                    store.release(entry)

    def run(self, order: list[Turn]) -> dict:
        for turn in order:
            self.run_turn(turn)
        stats = self.store.stats
        return {
            "lookups": stats.lookups,
            "hits": stats.hits,
            "hit_tokens": stats.hit_tokens,
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens_saved": self.prompt_tokens - self.prefilled,
            "inserts": stats.inserts,
            "tracked_checkpoints": self.tracked,
            "evictions": stats.evictions,
            "dropped_inserts": stats.dropped_inserts,
        }


def simulate(w: Workload, sizes: list[int], policies=POLICIES) -> list[dict]:
    """Records (op ``prefix_workload``) for each policy and store size, plus the unbounded store."""
    streams, order = build(w)
    unbounded = sum(s.tokens.size // w.block_size for s in streams) + 1  # every block-aligned prefix fits
    records = []
    for policy in policies:
        bound = Simulator(w, streams, unbounded, policy, w.seed + 1).run(order)
        for entries in [*sorted(sizes), unbounded]:
            result = bound if entries == unbounded else Simulator(w, streams, entries, policy, w.seed + 1).run(order)
            records.append(
                {
                    "config": "workload",
                    "op": "prefix_workload",
                    "policy": policy,
                    "entries": entries,
                    "unbounded": entries == unbounded,
                    **result,
                    "hit_rate": round(result["hits"] / max(result["lookups"], 1), 4),
                    "hit_token_ratio": round(result["hit_tokens"] / max(bound["hit_tokens"], 1), 4),
                    "prompt_tokens_saved_fraction": round(result["hit_tokens"] / max(result["prompt_tokens"], 1), 4),
                }
            )
    return records


def table(records: list[dict]) -> str:
    lines = [
        f"{'policy':<6} {'entries':>8} {'hit rate':>9} {'hit tokens':>11} {'vs unbounded':>13} "
        f"{'prefill saved':>14} {'of prompts':>11} {'evictions':>10}"
    ]
    for r in records:
        entries = f"{r['entries']}*" if r["unbounded"] else str(r["entries"])
        lines.append(
            f"{r['policy']:<6} {entries:>8} {r['hit_rate']:>9.3f} {r['hit_tokens']:>11} {r['hit_token_ratio']:>13.3f} "
            f"{r['prefill_tokens_saved']:>14} {r['prompt_tokens_saved_fraction']:>11.3f} {r['evictions']:>10}"
        )
    lines.append("* unbounded: large enough never to evict (the upper bound)")
    return "\n".join(lines)


def main(argv=None, base: Workload | None = None) -> int:
    """The command line; ``base`` gives the workload's defaults (the documented run when None)."""
    base = base or Workload()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one (printed)")
    parser.add_argument("--conversations", type=int, default=base.conversations)
    parser.add_argument("--system-prompts", type=int, default=base.system_prompts)
    parser.add_argument("--concurrency", type=int, default=base.concurrency)
    parser.add_argument("--block-size", type=int, default=base.block_size)
    parser.add_argument("--sizes", default="4,16,64,256", help="store sizes P (comma-separated)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="'' writes no file")
    parser.add_argument("--families", default="", help="e.g. chat,agentic,fewshot: the trace families instead")
    parser.add_argument("--scale", type=float, default=1.0, help="families: fraction of the documented traffic")
    parser.add_argument("--match-only", action="store_true", help="only time match of a 32k-token prompt")
    args = parser.parse_args(argv)
    seed = int(np.random.SeedSequence().entropy % 2**32) if args.seed is None else args.seed
    if args.match_only:
        return prefix_families.main_match(seed, args.out)
    if args.families:
        return prefix_families.main(args.families.split(","), seed, args.scale, args.out)
    w = dataclasses.replace(
        base,
        seed=seed,
        conversations=args.conversations,
        system_prompts=args.system_prompts,
        concurrency=args.concurrency,
        block_size=args.block_size,
    )
    print(f"prefix workload: seed {seed}, {w}", flush=True)
    records = simulate(w, [int(s) for s in args.sizes.split(",")])
    print(table(records))
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.date.today().isoformat(), "workload": dataclasses.asdict(w)}
        path = out / f"prefix_workload-{meta['date']}.json"
        path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
