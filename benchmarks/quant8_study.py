"""How much do 8-bit recurrent states cost? A long-generation study at realistic widths (CPU, NumPy).

    python benchmarks/quant8_study.py [--steps 4000] [--seeds 3] [--mixers mamba2 gdn]
        [--mamba2-heads 128] [--gdn-heads 32] [--quick]
        [--out-dir benchmarks/results] [--plot-dir docs/img]

The follow-up of ``benchmarks/precision_study.py`` for both tiny models, TinyMamba2 and
TinyGatedDeltaNet, with one layer at the widths of the presets (``SIZES``): Nemotron-H-8B's Mamba2
layer (128 heads x 64 x N = 128, 8 groups) and Qwen3-Next's Gated DeltaNet layer (32 value heads,
16 key heads, key dim 128 x value dim 128). The reference computes AND stores in float64; every
other run computes in float32 and stores its states after every token as one of ``RUNS``:
float32 (the floor), bfloat16 / float16 nearest, float8_e4m3fn / float8_e5m2 / int8 nearest and
stochastic, int8 with error feedback (the cache's rules: recurrent states per ``(head, d)`` group
of ``N``, the new conv column per 64-channel block, older conv columns never re-rounded, the
cache's Philox words keyed by layer, token position and element, the recurrent residual in
bfloat16).

How it is fast enough (the earlier version of this script ran the models' ``decode_step`` on a
cache manager and the library's uint64 conversions, 1.7 CPU-seconds a token at a quarter of
these widths):

- ``FastLayer`` is the models' one-layer decode step, vectorised: with one layer the input
  projection depends only on the token (a table of ``VOCAB`` rows, made once), and the read-out
  ``(update) @ embedding.T`` is ``y @ (out_proj @ embedding.T)`` (a ``[M, VOCAB]`` matrix). The
  state update, gates, conv window and skip are the models' operations, run in cache-sized blocks
  of heads with the store fused after each block (the state is read and written once a token);
  ``tests/test_quant8_study.py`` checks it against ``decode_step`` (float32 rounding level);
- the stores are ``benchmarks/quant8_stores.py``: the library's rules in float32 / uint32,
  checked bit for bit against ``quant8`` and ``convert``; the Philox words of a token are made
  once and shared by every row (they depend on position and element, not on the row);
- free-running greedy decoding needs no rows of its own until it leaves the reference's tokens
  (until then it is the teacher-forced row): a run's free row is forked from its teacher-forced
  row at its first different token and dropped once it differs from both float64 and float32;
- the speculative runs (V = 4 drafts of the reference's tokens, seeded random accept lengths shared
  by the rows) are rows of the same lockstep: the verify pass is a float32 chain from the main
  pool's state, and a commit of ``a`` accepted steps stores the state after them as its bfloat16
  per-step buffer holds it, then into the 8-bit main pool (its ``a`` new conv columns each with
  its own scale and words), as ``scatter_mtp_states`` does (checked bit for bit in the test).

Seeds are rows: each starts from its own token. Measured, per model:

1. teacher-forced (every run fed the float64 run's greedy tokens): the relative recurrent-state
   error (Frobenius) vs float64, every ``--every`` tokens;
2. free-running greedy decoding: the first token where a run's token differs from the float32
   run's (and from the float64 run's);
3. teacher-forced output logits vs float64: the error of every logit over the float64 logits'
   RMS at that token, percentiles over tokens (every ``--logit-every``), seeds and vocabulary;
4. speculative loop: 8-bit main pools with bfloat16 per-step buffers, next to float32 main with
   bfloat16 per-step; state error vs float64 at each commit.

Writes a new ``<out-dir>/quant8-study-<date>.json`` and ``<plot-dir>/quant8-study-<date>.svg``
(``benchmarks.records.new_results_path``: never over an earlier run's).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

# one BLAS thread: the products here are small, and OpenBLAS's threads spinning on a loaded 2-core
# machine made a [3, 8192] x [8192, 256] product take 270 ms instead of 4 (set before NumPy loads)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quant8_stores as stores  # noqa: E402
from benchmarks.precision_study import SEED  # noqa: E402
from benchmarks.records import new_results_path  # noqa: E402
from mamba_cache import Config  # noqa: E402
from mamba_cache.models import gdn, mamba2  # noqa: E402
from mamba_cache.precision import quant8  # noqa: E402
from mamba_cache.precision.reference import KIND_CONV, KIND_RECURRENT, rounding_bits  # noqa: E402

KERNEL, VOCAB, VERIFY = 4, 256, 4
#: one layer at the presets' widths: heads H, head dim D (GDN: key dim), state size N (GDN: value dim), groups G
SIZES = {
    "mamba2": {"heads": 128, "dim": 64, "state": 128, "groups": 8},  # nemotron-h-8b
    "gdn": {"heads": 32, "dim": 128, "state": 128, "groups": 16},  # qwen3-next-80b-a3b
}
QUICK = {
    "mamba2": {"heads": 2, "dim": 16, "state": 16, "groups": 1},
    "gdn": {"heads": 2, "dim": 16, "state": 16, "groups": 1},
}
#: name -> (store dtype, stochastic rounding, error feedback)
RUNS = {
    "float32": ("float32", False, False),
    "bfloat16 nearest": ("bfloat16", False, False),
    "float16 nearest": ("float16", False, False),
    "e4m3 nearest": ("float8_e4m3fn", False, False),
    "e4m3 stochastic": ("float8_e4m3fn", True, False),
    "e5m2 nearest": ("float8_e5m2", False, False),
    "e5m2 stochastic": ("float8_e5m2", True, False),
    "int8 nearest": ("int8", False, False),
    "int8 stochastic": ("int8", True, False),
    "int8 nearest + error feedback": ("int8", False, True),
    "int8 stochastic + error feedback": ("int8", True, True),
}
#: speculative runs: name -> (main pool dtype, stochastic, error feedback); per-step buffers bfloat16
MIXED = {
    "float32 main, bfloat16 per-step": ("float32", False, False),
    "e4m3 main (nearest), bfloat16 per-step": ("float8_e4m3fn", False, False),
    "e4m3 main (stochastic), bfloat16 per-step": ("float8_e4m3fn", True, False),
    "int8 main (nearest), bfloat16 per-step": ("int8", False, False),
    "int8 main (stochastic + error feedback), bfloat16 per-step": ("int8", True, True),
}
PERCENTILES = (50, 90, 99, 99.9, 100)
BLOCK = 1 << 17  # elements a block of heads aims at (all rows of a group): a few of them fit in L2


def conv_dim(mixer: str, sizes: dict) -> int:
    h, d, n, g = sizes["heads"], sizes["dim"], sizes["state"], sizes["groups"]
    return h * d + 2 * g * n if mixer == "mamba2" else 2 * g * d + h * n


def config(mixer, sizes, rows=1, dtype="float32", inter=None, seq=0, stochastic=False, feedback=False) -> Config:
    """The cache config of one layer of ``sizes`` (the model's, and the test's manager)."""
    return Config(
        num_recurrent_layers=1,
        max_batch_size=rows,
        recurrent_state_num_heads=sizes["heads"],
        recurrent_state_head_dim=sizes["dim"],
        recurrent_state_size=sizes["state"],
        n_groups=sizes["groups"],
        mixer=mixer,
        conv_dim=conv_dim(mixer, sizes),
        conv_kernel=KERNEL,
        max_intermediate_seq_len=seq,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=inter,
        stochastic_rounding=stochastic,
        error_feedback=feedback,
        rounding_seed=SEED,
        verify_writes_main_pool=not quant8.is_quant8(dtype),  # an 8-bit pool takes only commits
    )


def make_model(mixer, sizes):
    cls = mamba2.TinyMamba2 if mixer == "mamba2" else gdn.TinyGatedDeltaNet
    return cls(config(mixer, sizes), vocab_size=VOCAB, seed=3)


class FastLayer:
    """One layer of ``model`` (TinyMamba2 or TinyGatedDeltaNet) decoding rows of states, in ``dtype``.

    The models' decode step with the token's input projection and the read-out tabulated (see the
    module docstring). ``step`` advances the states of a `Group` in place and returns the logits.
    """

    def __init__(self, model, dtype=np.float32) -> None:
        cfg, w = model.config, model.weights
        self.mixer, self.dtype = cfg.mixer, np.dtype(dtype)
        self.heads, self.dim, self.size, self.groups = (
            cfg.recurrent_state_num_heads,
            cfg.recurrent_state_head_dim,
            cfg.recurrent_state_size,
            cfg.n_groups,
        )
        self.channels = cfg.conv_dim
        f = self.dtype.type
        emb = w["embedding"].astype(dtype)
        normed = emb * (f(1) / np.sqrt((emb * emb).sum(axis=1, dtype=dtype) / f(emb.shape[1]) + f(1e-5)))[:, None]
        self.z = normed @ w["in_proj"][0].astype(dtype)  # [VOCAB, C + ...]: the input projection of each token
        self.readout = w["out_proj"][0].astype(dtype) @ emb.T  # [M, VOCAB]
        self.w = {k: w[k][0].astype(dtype) for k in ("conv_weight", "conv_bias", "dt_bias", "a")}
        if self.mixer == "mamba2":
            self.w["d_skip"] = w["d_skip"][0].astype(dtype)
        per_head = self.dim * self.size
        self.block_heads = lambda rows: max(1, min(self.heads, BLOCK // (rows * per_head)))

    def _conv(self, group, tokens):
        f = self.dtype.type
        z = self.z[tokens]
        conv = group.conv
        conv[:, :, :-1] = conv[:, :, 1:]
        conv[:, :, -1] = z[:, : self.channels]
        pre = (conv * self.w["conv_weight"]).sum(axis=2, dtype=self.dtype) + self.w["conv_bias"]
        return z, pre / (f(1) + np.exp(-pre))  # silu

    def _softplus(self, v):
        f = self.dtype.type
        return np.where(v > f(20), v, np.log1p(np.exp(np.minimum(v, f(20))))).astype(self.dtype)

    def step(self, group, tokens, store=None) -> np.ndarray:
        """Advance the rows by ``tokens`` ``[R]``, calling ``store(group, heads)`` after each block; the logits."""
        f, rows = self.dtype.type, len(tokens)
        heads, dim, size, per = self.heads, self.dim, self.size, self.heads // self.groups
        z, xbc = self._conv(group, tokens)
        c = self.channels
        if self.mixer == "mamba2":
            x = xbc[:, : heads * dim].reshape(rows, heads, dim)
            b_in = np.repeat(
                xbc[:, heads * dim : heads * dim + self.groups * size].reshape(rows, -1, size), per, axis=1
            )
            c_out = np.repeat(xbc[:, heads * dim + self.groups * size :].reshape(rows, -1, size), per, axis=1)
            dt = self._softplus(z[:, c:] + self.w["dt_bias"])
            decay = np.exp(dt * self.w["a"])  # [R, H]
            u = dt[:, :, None] * x  # [R, H, D]
            out = np.empty((rows, heads, dim), self.dtype)
        else:
            keys = self.groups * dim

            def l2norm(v):
                return v * (f(1) / np.sqrt((v * v).sum(axis=-1, dtype=self.dtype) + f(1e-6)))[..., None]

            q = np.repeat(l2norm(xbc[:, :keys].reshape(rows, -1, dim)), per, axis=1)  # [R, H, D]
            k = np.repeat(l2norm(xbc[:, keys : 2 * keys].reshape(rows, -1, dim)), per, axis=1)
            v = xbc[:, 2 * keys :].reshape(rows, heads, size)
            decay = np.exp(self.w["a"] * self._softplus(z[:, c : c + heads] + self.w["dt_bias"]))  # g [R, H]
            beta = f(1) / (f(1) + np.exp(-z[:, c + heads :]))
            out = np.empty((rows, heads, size), self.dtype)
        hb = self.block_heads(rows)
        scratch = np.empty((rows, hb, dim, size), self.dtype)
        for h0 in range(0, heads, hb):
            sl = slice(h0, min(h0 + hb, heads))
            state, tmp = group.rec[:, sl], scratch[:, : sl.stop - h0]
            state *= decay[:, sl, None, None]
            if self.mixer == "mamba2":  # h * dA + (dt * x) (outer) B, then y = h . C
                np.multiply(u[:, sl, :, None], b_in[:, sl, None, :], out=tmp)
                state += tmp
                out[:, sl] = np.matmul(state, c_out[:, sl, :, None])[..., 0]
            else:  # the delta rule on the decayed state, then o = q . S
                pred = np.matmul(k[:, sl, None, :], state)[:, :, 0]  # [R, hb, N]
                delta = beta[:, sl, None] * (v[:, sl] - pred)
                np.multiply(k[:, sl, :, None], delta[:, :, None, :], out=tmp)
                state += tmp
                out[:, sl] = np.matmul(q[:, sl, None, :], state)[:, :, 0]
            if store is not None:
                store(group, sl)
        if self.mixer == "mamba2":
            out += self.w["d_skip"][None, :, None] * x
        return out.reshape(rows, -1) @ self.readout


class Words:
    """The cache's stochastic-rounding words of one token position, shared by every row."""

    def __init__(self, layer: FastLayer, position: int, needed: bool) -> None:
        self.rec = self.rec_uniform = self.conv = self.conv_uniform = None
        if not needed:
            return
        shape = (layer.heads, layer.dim, layer.size)
        self.rec = rounding_bits(SEED, 0, KIND_RECURRENT, position, int(np.prod(shape))).reshape(shape)
        words = rounding_bits(SEED, 0, KIND_CONV, position, layer.channels * KERNEL).reshape(layer.channels, KERNEL)
        self.conv = words[:, -1].copy()  # the words of the column that enters the window at this position
        self.rec_uniform = uniform(self.rec)
        self.conv_uniform = uniform(self.conv)


def uniform(words):
    return (words >> np.uint32(8)).astype(np.float64) * 2.0**-24


class Group:
    """Rows of states that share one store (``spec``: dtype, stochastic, error feedback)."""

    def __init__(self, layer: FastLayer, spec, rows: int, dtype=np.float32) -> None:
        self.spec = spec
        self.rec = np.zeros((rows, layer.heads, layer.dim, layer.size), dtype)
        self.conv = np.zeros((rows, layer.channels, KERNEL), dtype)
        self.residual = np.zeros_like(self.rec) if spec[2] else None
        self.words = None  # the Words of the token being stored

    def fork(self, row: int) -> Group:
        other = object.__new__(Group)
        other.spec, other.words = self.spec, None
        other.rec, other.conv = self.rec[row : row + 1].copy(), self.conv[row : row + 1].copy()
        other.residual = None if self.residual is None else self.residual[row : row + 1].copy()
        return other

    def store_block(self, group, sl) -> None:
        """The per-token store of the recurrent heads ``sl`` (a ``FastLayer.step`` hook)."""
        dtype, stochastic, _ = self.spec
        block = self.rec[:, sl]
        if not quant8.is_quant8(dtype):
            if dtype != "float32":
                flat = block.copy()
                stores.round16(flat, dtype)
                block[...] = flat
            return
        residual = None if self.residual is None else self.residual[:, sl]
        words = self.words.rec[sl] if stochastic and dtype != "int8" else None
        uniform_ = self.words.rec_uniform[sl] if stochastic and dtype == "int8" else None
        stores.store8(block, dtype, words, uniform_, residual)

    def store_columns(self, columns: int, words: list) -> None:
        """Store the last ``columns`` conv columns (``words[j]``: the Words of column ``-1 - j``'s position)."""
        dtype, stochastic, _ = self.spec
        for j in range(columns):
            col = self.conv[:, :, KERNEL - 1 - j].copy()
            if quant8.is_quant8(dtype):
                w = words[j]
                stores.store_column(
                    col,
                    dtype,
                    w.conv if stochastic and dtype != "int8" else None,
                    w.conv_uniform if stochastic and dtype == "int8" else None,
                )
            else:
                stores.round16(col, dtype)
            self.conv[:, :, KERNEL - 1 - j] = col

    def commit(self, layer: FastLayer, accepted: int, words: list) -> None:
        """A speculative commit of ``accepted`` steps, as ``scatter_mtp_states`` from bfloat16 per-step buffers.

        The per-step buffer holds the state after the last accepted step in bfloat16 (nearest); the
        main pool stores it (8-bit: quantised with the words of this position, and the ``accepted``
        new conv columns each with the words of the position it entered at; the older columns stay
        as they are, moved and never rounded again).
        """
        hb = layer.block_heads(len(self.rec))
        self.words = words[0]
        for h0 in range(0, self.rec.shape[1], hb):
            sl = slice(h0, h0 + hb)
            block = np.ascontiguousarray(self.rec[:, sl])
            stores.round_bfloat16(block)
            self.rec[:, sl] = block
            self.store_block(self, sl)
        new = min(accepted, KERNEL)
        window = np.ascontiguousarray(self.conv[:, :, KERNEL - new :])
        stores.round_bfloat16(window)
        self.conv[:, :, KERNEL - new :] = window
        if quant8.is_quant8(self.spec[0]):
            self.store_columns(new, words)


def row_errors(state, reference) -> np.ndarray:
    """Per row: ``|state - reference| / |reference|`` (Frobenius, float64 differences)."""
    diff = np.subtract(state.reshape(len(state), -1), reference.reshape(len(reference), -1), dtype=np.float64)
    ref = reference.reshape(len(reference), -1)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff) / np.einsum("ij,ij->i", ref, ref))


def needs_words(specs) -> bool:
    return any(spec[1] for spec in specs)


def run_model(model, steps, seeds, every, logit_every, progress=0):
    """Items 1-4 for one model: every row advanced in lockstep, one token a step."""
    fast, wide = FastLayer(model), FastLayer(model, np.float64)
    ref = Group(wide, ("float64", False, False), seeds, np.float64)
    tf = {name: Group(fast, spec, seeds) for name, spec in RUNS.items()}
    spec_groups = {name: Group(fast, spec, seeds) for name, spec in MIXED.items()}
    stochastic = needs_words([*RUNS.values(), *MIXED.values()])
    start = np.random.default_rng(SEED).choice(VOCAB, seeds, replace=False)
    ref_token = start
    errors = {name: [] for name in RUNS}
    logit_errors = {name: [] for name in RUNS}
    spec_errors = {name: [] for name in MIXED}
    margins, ref_seq = [], []
    # free-running tracks per (run, seed): 0 with the reference (its teacher-forced row), 1 own row, 2 done
    status = {name: [0] * seeds for name in RUNS}
    div64 = {name: [None] * seeds for name in RUNS}
    div32 = {name: [None] * seeds for name in RUNS}
    forks, fork_rows = {}, 0  # (name, seed) -> [Group of one row, its next token]
    accepts = np.random.default_rng(SEED + 1)
    position, accepted, commits = 0, int(accepts.integers(1, VERIFY + 1)), 0
    recent = []  # the Words of the last KERNEL positions, newest first
    for t in range(steps):
        words = Words(fast, t + 1, stochastic)
        recent = [words, *recent[: KERNEL - 1]]
        ref_logits = wide.step(ref, ref_token)
        top = np.sort(ref_logits, axis=1)
        margins.append(float(np.min(top[:, -1] - top[:, -2])))
        ref_next = np.argmax(ref_logits, axis=1)
        feed = np.asarray(ref_token)
        produced = {}
        for name, group in tf.items():
            group.words = words
            logits = fast.step(group, feed, group.store_block)
            group.store_columns(1, recent)
            produced[name] = np.argmax(logits, axis=1)
            if t % logit_every == 0:
                rms = np.sqrt(np.mean(ref_logits**2, axis=1, keepdims=True))
                logit_errors[name].append((np.abs(logits.astype(np.float64) - ref_logits) / rms).astype(np.float32))
        for fork in list(forks.values()):
            fork[0].words = words
            logits = fast.step(fork[0], np.array([fork[1]]), fork[0].store_block)
            fork[0].store_columns(1, recent)
            fork[1] = int(np.argmax(logits[0]))
        for group in spec_groups.values():  # the verify chain: float32, no store until a commit
            fast.step(group, feed)
        if t + 1 == position + accepted and position + VERIFY < steps:
            position += accepted
            sample = position // every != (position - accepted) // every or position + VERIFY >= steps
            for name, group in spec_groups.items():
                group.commit(fast, accepted, recent)
                if sample:  # the first commit past each multiple of `every` tokens, and the last
                    spec_errors[name].append((position, row_errors(group.rec, ref.rec).tolist()))
            commits += 1
            accepted = int(accepts.integers(1, VERIFY + 1))
        # free-running bookkeeping
        token = {
            (name, s): int(produced[name][s]) if status[name][s] == 0 else forks[(name, s)][1]
            for name in RUNS
            for s in range(seeds)
            if status[name][s] != 2
        }
        for (name, s), p in token.items():
            f32 = token.get(("float32", s), p)
            if div64[name][s] is None and p != ref_next[s]:
                div64[name][s] = t + 1
            if div32[name][s] is None and p != f32:
                div32[name][s] = t + 1
        for (name, s), p in token.items():
            done = div64[name][s] is not None and div32[name][s] is not None
            if name == "float32":
                done = div64[name][s] is not None and all(div32[n][s] is not None for n in RUNS if n != "float32")
            if done:
                status[name][s] = 2
                forks.pop((name, s), None)
            elif status[name][s] == 0 and p != ref_next[s]:
                status[name][s] = 1
                forks[(name, s)] = [tf[name].fork(s), p]
                fork_rows += 1
        ref_seq.append(ref_next)
        ref_token = ref_next
        if progress and (t + 1) % progress == 0:
            print(f"  {t + 1} tokens, {time.process_time():.0f} CPU-s, forks {len(forks)}", flush=True)
        if (t + 1) % every == 0:
            for name, group in tf.items():
                errors[name].append(row_errors(group.rec, ref.rec).tolist())
    ref_seq = np.stack(ref_seq)
    result = {}
    for name in RUNS:
        err = np.array(errors[name])
        le = np.concatenate(logit_errors[name]).ravel()
        result[name] = {
            "state_error_median": np.median(err, axis=1).tolist(),
            "state_error_final": err[-1].tolist(),
            "state_error_mean": float(err.mean()),
            "first_divergence_vs_float32": div32[name],
            "first_divergence_vs_float64": div64[name],
            "logit_error_percentiles": {str(p): float(np.percentile(le, p)) for p in PERCENTILES},
        }
    spec = {
        name: {
            "commits": commits,
            "samples": len(errs),
            "state_error_final": errs[-1][1],
            "state_error_mean": float(np.mean([e for _, e in errs])),
            "state_error_median_series": [[p, float(np.median(e))] for p, e in errs],
        }
        for name, errs in spec_errors.items()
    }
    reference = {
        "start_tokens": start.tolist(),
        "distinct_tokens": [len(set(ref_seq[:, s].tolist())) for s in range(seeds)],
        "top2_logit_margin_min": float(min(margins)),
        "top2_logit_margin_median": float(np.median(margins)),
        "free_rows_forked": fork_rows,
    }
    return result, spec, reference


COLOURS = {
    "float32": "#000000",
    "bfloat16 nearest": "#1f77b4",
    "float16 nearest": "#2ca02c",
    "e4m3 nearest": "#d62728",
    "e4m3 stochastic": "#ff9896",
    "e5m2 nearest": "#9467bd",
    "e5m2 stochastic": "#c5b0d5",
    "int8 nearest": "#8c564b",
    "int8 stochastic": "#e377c2",
    "int8 nearest + error feedback": "#ff7f0e",
    "int8 stochastic + error feedback": "#bcbd22",
}
WIDTH, PANEL, HEIGHT = 1000, 400, 430


def sizes_label(sizes: dict) -> str:
    return f"{sizes['heads']} x {sizes['dim']} x {sizes['state']}"


def svg(result: dict) -> str:
    """Median state error over time, log scale, one panel per model (plain SVG, deterministic)."""
    lo, hi = -9.0, 1.0
    parts = []
    titles = {"mamba2": "TinyMamba2", "gdn": "TinyGatedDeltaNet"}
    for p, mixer in enumerate(result["models"]):
        title = f"{titles[mixer]} ({sizes_label(result['models'][mixer]['sizes'])})"
        x0, y0, w, h = 60 + p * (PANEL + 60), 30, PANEL, 300
        runs = result["models"][mixer]["runs"]
        steps = result["steps"]
        parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
        parts.append(f'<text x="{x0 + w / 2}" y="{y0 - 10}" text-anchor="middle" font-size="13">{title}</text>')
        for e in range(int(lo), int(hi) + 1):
            y = y0 + h * (hi - e) / (hi - lo)
            parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{x0 - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="10">1e{e}</text>')
        for k in range(5):
            x = x0 + w * k / 4
            parts.append(
                f'<text x="{x:.1f}" y="{y0 + h + 14}" text-anchor="middle" font-size="10">{steps * k // 4}</text>'
            )
        parts.append(
            f'<text x="{x0 + w / 2}" y="{y0 + h + 30}" text-anchor="middle" font-size="11">'
            "tokens decoded (teacher-forced)</text>"
        )
        for name, run in runs.items():
            series = run["state_error_median"]
            every = steps / len(series)
            pts = []
            for i, v in enumerate(series):
                v = min(max(np.log10(max(v, 1e-30)), lo), hi)
                pts.append(f"{x0 + w * every * (i + 1) / steps:.1f},{y0 + h * (hi - v) / (hi - lo):.1f}")
            parts.append(
                f'<polyline points="{" ".join(pts)}" fill="none" stroke="{COLOURS[name]}" stroke-width="1.3"/>'
            )
    for i, name in enumerate(RUNS):
        x, y = 60 + (i % 5) * 190, HEIGHT - 36 + (i // 5) * 16
        parts.append(
            f'<line x1="{x}" y1="{y - 4}" x2="{x + 18}" y2="{y - 4}" stroke="{COLOURS[name]}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{x + 22}" y="{y}" font-size="10">{name}</text>')
    parts.append(
        '<text x="14" y="180" font-size="11" transform="rotate(-90 14 180)" text-anchor="middle">'
        "relative recurrent-state error vs float64 (median over seeds)</text>"
    )
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT + 10}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT + 10}" font-family="sans-serif">'
    )
    return "\n".join([head, '<rect width="100%" height="100%" fill="white"/>', *parts, "</svg>"]) + "\n"


def write(result: dict, out_dir, plot_dir) -> None:
    out = new_results_path(out_dir, "quant8-study")
    out.write_text(json.dumps(result, indent=1))
    plot = new_results_path(plot_dir, "quant8-study", suffix=".svg")
    plot.write_text(svg(result))
    print(f"wrote {out} and {plot}")


def combine(paths, out_dir, plot_dir) -> int:
    """One results file and plot from runs of one model each (run as parallel processes)."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    result = {k: v for k, v in parts[0].items() if k != "models"}
    result["models"] = {mixer: model for part in parts for mixer, model in part["models"].items()}
    result["combined_from"] = [pathlib.Path(p).name for p in paths]
    write(result, out_dir, plot_dir)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--logit-every", type=int, default=4)
    parser.add_argument("--mixers", nargs="+", choices=("mamba2", "gdn"), default=["mamba2", "gdn"])
    parser.add_argument("--mamba2-heads", type=int, help="fewer Mamba2 heads than the preset's 128 (a multiple of 8)")
    parser.add_argument("--gdn-heads", type=int, help="fewer Gated DeltaNet value heads than the preset's 32 (even)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test")
    parser.add_argument("--progress", type=int, default=0, help="print a line every this many tokens")
    parser.add_argument("--combine", nargs="+", help="merge these results files (one model each) into one, and plot it")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--plot-dir", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out_dir, args.plot_dir)
    sizes = {mixer: dict(size) for mixer, size in (QUICK if args.quick else SIZES).items()}
    if args.mamba2_heads:
        sizes["mamba2"]["heads"] = args.mamba2_heads
    if args.gdn_heads:
        sizes["gdn"].update(heads=args.gdn_heads, groups=args.gdn_heads // 2)
    result = {
        "steps": args.steps,
        "seeds": args.seeds,
        "every": args.every,
        "logit_every": args.logit_every,
        "layers": 1,
        "conv_kernel": KERNEL,
        "vocab": VOCAB,
        "verify_len": VERIFY,
        "models": {},
    }
    for mixer in args.mixers:
        began, wall = time.process_time(), time.perf_counter()
        runs, spec, reference = run_model(
            make_model(mixer, sizes[mixer]), args.steps, args.seeds, args.every, args.logit_every, args.progress
        )
        result["models"][mixer] = {
            "sizes": sizes[mixer],
            "reference": reference,
            "runs": runs,
            "speculative": spec,
            "cpu_seconds": round(time.process_time() - began, 1),
            "wall_seconds": round(time.perf_counter() - wall, 1),
        }
        print(f"{mixer} {sizes[mixer]} ({result['models'][mixer]['cpu_seconds']} CPU-s) reference {reference}")
        for name, run in runs.items():
            pct = run["logit_error_percentiles"]
            print(
                f"  {name:<34} state err final {np.median(run['state_error_final']):.2e} "
                f"mean {run['state_error_mean']:.2e}  diverge vs f32 {run['first_divergence_vs_float32']} "
                f"vs f64 {run['first_divergence_vs_float64']}  logit p50 {pct['50']:.1e} p99 {pct['99']:.1e}"
            )
        for name, run in spec.items():
            print(f"  {name:<60} final {np.median(run['state_error_final']):.2e} mean {run['state_error_mean']:.2e}")
        sys.stdout.flush()
    write(result, args.out_dir, args.plot_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
