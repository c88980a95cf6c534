"""Seeded request traces for the prefix-store workloads, a FLOP model of a hybrid model, a TTFT model.

Three families, each a list of streams (one token stream per conversation / session / request) and an
interleaved order of requests over them. A request covers ``stream[:end]``: its prompt is
``stream[:prompt]``, the rest is its reply. Every stream is built from nested shared parts (tiers):
``tiers = [(length, owner), ...]``, ascending, meaning ``stream[:length]`` is the same token list in every
stream with the same ``owner`` at that tier; past the last tier the stream is its own. Two streams
share exactly the longest tier they agree on, which gives the oracle and the simulated "state".

Shapes (from published trace statistics; the numbers used are the dataclass defaults below):

- ``chat`` (ShareGPT-like multi-turn chat): ShareGPT conversations average about 3.5 turns with
  heavy-tailed user messages (median tens of tokens, long tail of pasted text) and replies of a few
  hundred tokens (the vLLM / SGLang ShareGPT benchmark subsets: mean input about 200-300 tokens, mean
  output about 200). Here: geometric(0.3) turns (>= 1, mean 3.3) capped at 10; user tokens lognormal (median 60,
  sigma 1.1) in [4, 3000]; reply tokens lognormal (median 220, sigma 0.7) in [8, 1500]; one of 4 system
  prompts (120-600 tokens, Zipf popularity); 16 conversations open at once, turns interleaved.
- ``agentic`` (SWE-bench-like agent sessions): a long prefix shared by every session (system prompt and
  tool schemas, 6,000 tokens), a per-session task context (issue text and repository files,
  2,000-8,000 tokens), then many short tool turns: the model's action (40-300 tokens) and the tool's
  observation (80-1,500 tokens, lognormal) each turn, 15-40 turns (SWE-agent trajectories take about
  30 steps on average and grow to 20-40k tokens of context). 8 sessions open at once.
- ``fewshot`` (few-shot / shared system prompts): single-turn requests; each starts with one of 6
  shared prefixes (system prompt plus few-shot examples, 800-4,000 tokens, Zipf popularity) followed by a
  unique question (20-300 tokens) and an answer (20-400 tokens).

FLOP model of a Nemotron-H-8B-like hybrid (stated assumptions, forward pass, 2 FLOPs per multiply-add):
52 layers = 24 Mamba-2 + 24 MLP + 4 attention, d_model 4096; MLP: up and down projections to 21,504
(squared ReLU, no gate): 4 d F = 352.3 MFLOP per token; attention: 32 query heads, 8 KV heads of 128:
projections 2 d (2 d + 2 * 1024) = 83.9 MFLOP per token plus 4 d t = 16,384 t FLOP for the token at
position t (scores and values); Mamba-2: d_inner 8192 (128 heads of 64), 8 groups, state 128: in and out
projections 2 d (2 * 8192 + 2 * 8 * 128 + 128) + 2 * 8192 d = 219.2 MFLOP, conv 2 * 10240 * 4 = 0.08
MFLOP and the scan about 6 * 8192 * 128 = 6.3 MFLOP per token. So a token at position t costs
``A + B t`` with A = 24 * 225.6 + 24 * 352.3 + 4 * 83.9 MFLOP = 14.21 GFLOP and B = 4 * 16,384 = 65,536
FLOP; prefilling positions h..n-1 costs ``A (n - h) + B (n^2 - h^2) / 2`` (LM head left out: prefill
computes one row of logits either way).

TTFT model: ``TTFT = fixed + prefill FLOPs / (peak * MFU) + restore``: fixed 8 ms (scheduling,
tokenisation, the first decode step), peak 989 TFLOP/s (H100 SXM dense BF16) at MFU 0.45, restore = one
entry's bytes (24 layers of fp32 [128, 64, 128] recurrent plus bf16 [10240, 4] conv = 102.6 MB) at
2.5 TB/s when there is a hit. Attention KV is assumed cached for any prefix (a hybrid engine's KV
cache is not the bottleneck modelled here).
"""

from __future__ import annotations

import dataclasses

import numpy as np

VOCAB = 50_000

# ---------------------------------------------------------------- the FLOP and TTFT models
D_MODEL, FFN, KV = 4096, 21_504, 8 * 128
MLP_FLOPS = 4 * D_MODEL * FFN
ATTN_FLOPS = 2 * D_MODEL * (2 * D_MODEL + 2 * KV)
MAMBA_FLOPS = 2 * D_MODEL * (2 * 8192 + 2 * 8 * 128 + 128) + 2 * 8192 * D_MODEL + 2 * 10_240 * 4 + 6 * 8192 * 128
#: FLOPs of one token, linear part (A) and per position of it (B): a token at position t costs A + B t.
FLOPS_A = 24 * MAMBA_FLOPS + 24 * MLP_FLOPS + 4 * ATTN_FLOPS
FLOPS_B = 4 * 4 * D_MODEL
ENTRY_BYTES = 24 * (128 * 64 * 128 * 4 + 10_240 * 4 * 2)
PEAK, MFU, FIXED_S, COPY_BPS = 989e12, 0.45, 0.008, 2.5e12


def prefill_flops(start, end):
    """FLOPs to prefill positions ``start .. end - 1`` (scalars or NumPy arrays)."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    return FLOPS_A * (end - start) + FLOPS_B * (end**2 - start**2) / 2


def saved_flops(n):
    """FLOPs a hit on a checkpoint after ``n`` tokens saves (the prefill of its prefix)."""
    return prefill_flops(0, n)


def ttft(prompt, hit):
    """Modelled seconds to first token of a ``prompt``-token request that restored a ``hit``-token checkpoint."""
    prompt, hit = np.asarray(prompt, np.float64), np.asarray(hit, np.float64)
    return FIXED_S + prefill_flops(hit, prompt) / (PEAK * MFU) + np.where(hit > 0, ENTRY_BYTES / COPY_BPS, 0.0)


# ---------------------------------------------------------------- traces
@dataclasses.dataclass
class Request:
    stream: int
    prompt: int  #: tokens of the prompt (a prefix of the stream)
    end: int  #: tokens after the reply


@dataclasses.dataclass
class Trace:
    family: str
    streams: list  #: token arrays (int32)
    tiers: list  #: per stream: [(length, owner), ...] ascending
    requests: list  #: in arrival order


def _lognormal(rng, median, sigma, low, high) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), low, high))


def _zipf(rng, n, s=1.1) -> int:
    p = 1.0 / np.arange(1, n + 1) ** s
    return int(rng.choice(n, p=p / p.sum()))


def interleave(rng, plans: list, concurrency: int) -> list:
    """Requests of ``plans`` (one list per stream), ``concurrency`` streams open at once, turns in random order."""
    order, waiting, active = [], list(range(len(plans))), []
    while waiting or active:
        while waiting and len(active) < concurrency:
            active.append(waiting.pop(0))
        pick = int(rng.integers(len(active)))
        s = active[pick]
        order.append(plans[s].pop(0))
        if not plans[s]:
            active.pop(pick)
    return order


def _tokens(rng, n) -> np.ndarray:
    return rng.integers(0, VOCAB, size=n, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class Chat:
    conversations: int = 240
    system_prompts: int = 4
    system_tokens: tuple = (120, 600)
    concurrency: int = 16

    def build(self, rng) -> Trace:
        systems = [_tokens(rng, int(rng.integers(*self.system_tokens))) for _ in range(self.system_prompts)]
        streams, tiers, plans = [], [], []
        for c in range(self.conversations):
            s = _zipf(rng, self.system_prompts)
            parts, plan, at = [systems[s]], [], systems[s].size
            for _ in range(min(10, int(rng.geometric(0.3)))):  # geometric(0.3): >= 1, mean 3.3
                user = _lognormal(rng, 60, 1.1, 4, 3000)
                reply = _lognormal(rng, 220, 0.7, 8, 1500)
                parts.append(_tokens(rng, user + reply))
                plan.append(Request(c, at + user, at + user + reply))
                at += user + reply
            streams.append(np.concatenate(parts))
            tiers.append([(systems[s].size, ("system", s))])
            plans.append(plan)
        return Trace("chat", streams, tiers, interleave(rng, plans, self.concurrency))


@dataclasses.dataclass(frozen=True)
class Agentic:
    sessions: int = 24
    shared_tokens: int = 6000
    context_tokens: tuple = (2000, 8000)
    turns: tuple = (15, 40)
    concurrency: int = 8

    def build(self, rng) -> Trace:
        shared = _tokens(rng, self.shared_tokens)
        streams, tiers, plans = [], [], []
        for s in range(self.sessions):
            context = _tokens(rng, int(rng.integers(*self.context_tokens)))
            parts, plan, at = [shared, context], [], shared.size + context.size
            prompt = at
            for _ in range(int(rng.integers(self.turns[0], self.turns[1] + 1))):
                action = int(rng.integers(40, 301))
                observation = _lognormal(rng, 350, 0.8, 80, 1500)
                parts.append(_tokens(rng, action + observation))
                plan.append(Request(s, prompt, at + action))  # the model's action is the reply
                at += action + observation
                prompt = at  # the next prompt: everything, the tool's observation included
            streams.append(np.concatenate(parts))
            tiers.append([(shared.size, ("agent", 0))])
            plans.append(plan)
        return Trace("agentic", streams, tiers, interleave(rng, plans, self.concurrency))


@dataclasses.dataclass(frozen=True)
class FewShot:
    requests: int = 600
    prefixes: int = 6
    prefix_tokens: tuple = (800, 4000)

    def build(self, rng) -> Trace:
        shared = [_tokens(rng, int(rng.integers(*self.prefix_tokens))) for _ in range(self.prefixes)]
        streams, tiers, order = [], [], []
        for r in range(self.requests):
            p = _zipf(rng, self.prefixes)
            question, answer = int(rng.integers(20, 301)), int(rng.integers(20, 401))
            streams.append(np.concatenate([shared[p], _tokens(rng, question + answer)]))
            tiers.append([(shared[p].size, ("shot", p))])
            order.append(Request(r, shared[p].size + question, shared[p].size + question + answer))
        return Trace("fewshot", streams, tiers, order)


FAMILIES = {"chat": Chat, "agentic": Agentic, "fewshot": FewShot}


def build(family: str, seed: int, **overrides) -> Trace:
    """The trace of ``family`` from ``seed`` (overrides: the family's dataclass fields)."""
    return FAMILIES[family](**overrides).build(np.random.default_rng(seed))


def owner(trace: Trace, stream: int, n: int) -> tuple:
    """Who the state after ``n`` tokens of ``stream`` belongs to: a shared tier's owner, else the stream."""
    for length, who in trace.tiers[stream]:
        if n <= length:
            return who
    return ("stream", stream)


def oracle_hits(trace: Trace) -> np.ndarray:
    """Per request: the longest prefix of its prompt (leaving a token) that any earlier request consumed.

    An unbounded store holding a checkpoint at every position a later request reuses hits exactly this.
    A request consumes its prompt and its reply but the last sampled token.
    """
    consumed: dict[int, int] = {}  # stream -> tokens consumed by its requests so far
    shared: dict[tuple, int] = {}  # tier owner -> the longest run of it consumed so far
    hits = np.zeros(len(trace.requests), np.int64)
    for i, r in enumerate(trace.requests):
        best = min(consumed.get(r.stream, 0), r.prompt - 1)
        for length, who in trace.tiers[r.stream]:
            best = max(best, min(shared.get(who, 0), length, r.prompt - 1))
        hits[i] = best
        done = r.end - 1
        consumed[r.stream] = max(consumed.get(r.stream, 0), done)
        for length, who in trace.tiers[r.stream]:
            shared[who] = max(shared.get(who, 0), min(length, done))
    return hits
