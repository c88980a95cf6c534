"""How much do 8-bit recurrent states cost? A long-generation study on the NumPy tiny models (CPU).

    python benchmarks/quant8_study.py [--steps 4000] [--seeds 3] [--quick]
        [--out benchmarks/results/quant8-study.json] [--plot docs/img/quant8-study.svg]

The follow-up of ``benchmarks/precision_study.py`` (whose float64 reference, greedy read-out and
16-bit stores it reuses) for both tiny models, TinyMamba2 and TinyGatedDeltaNet, at realistic state
widths (``SIZES``). The reference computes AND stores in float64; every other run computes in
float32 and stores its states, after every token, as one of ``RUNS``:

    float32 (the floor), bfloat16 / float16 nearest and stochastic (mamba_cache.precision.convert,
    as the 16-bit study), float8_e4m3fn / float8_e5m2 / int8 nearest and stochastic, int8 with error
    feedback (mamba_cache.precision.quant8.store: the cache's scale groups and its own Philox
    words; recurrent states per (head, d) group of N, the new conv column per (64-channel block);
    older conv columns are never re-rounded, error feedback carries the recurrent residual in
    bfloat16, as the cache does).

The tiny models do not decode into 8-bit pools, so the per-token runs keep float32 pools holding
the dequantised 8-bit values (bit for bit what an 8-bit pool reads as). The speculative runs (4)
do use the manager's 8-bit pools: the verify pass runs on a float32 copy whose main pool is the
8-bit pool dequantised, its bfloat16 per-step states are copied into the 8-bit manager's per-step
buffers, and the manager's own ``scatter_mtp_states`` quantises the accepted step.

Seeds are batch rows of one cache: each row starts from its own token. For one model:

1. teacher-forced (every run fed the float64 run's greedy tokens): the relative recurrent-state
   error (Frobenius over all layers) vs float64, every ``--every`` tokens;
2. free-running greedy decoding: the first token where a run's token differs from the float32
   run's (and from the float64 run's);
3. teacher-forced output logits (``precision_study.logits``, per row) vs float64: the error of
   every logit over the float64 logits' RMS at that token, percentiles over tokens, seeds, vocab;
4. speculative loop (V = 4 drafts of the reference tokens, seeded random accept lengths shared by
   the rows): 8-bit main pools with bfloat16 per-step buffers, next to float32 main with bfloat16
   per-step; state error vs float64 along the accepted tokens.

Matrix-vector products run through ``numpy.matmul`` (``fast_matvec``) to fit the CPU budget; the
state updates, gates and stores are the models' own code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.precision_study import SEED, float64_arithmetic, quantise  # noqa: E402
from mamba_cache import Config, NumpyMambaCacheManager  # noqa: E402
from mamba_cache.models import gdn, mamba2  # noqa: E402
from mamba_cache.precision import bfloat16, quant8  # noqa: E402

LAYERS, KERNEL, VOCAB, VERIFY = 1, 4, 256, 4
#: heads H, head dim D, state size N, groups G per model: the scale group (N = 128 elements) as in
#: the real models, fewer heads and rows of it (the CPU budget of a shared 2-core machine).
SIZES = {
    "mamba2": {"heads": 1, "dim": 32, "state": 128, "groups": 1},
    "gdn": {"heads": 1, "dim": 32, "state": 128, "groups": 1},
}
QUICK = {
    "mamba2": {"heads": 2, "dim": 8, "state": 16, "groups": 1},
    "gdn": {"heads": 2, "dim": 8, "state": 16, "groups": 1},
}
#: name -> (store dtype, stochastic rounding, error feedback)
RUNS = {
    "float32": ("float32", False, False),
    "bfloat16 nearest": (bfloat16, False, False),
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


def config(mixer, sizes, rows, dtype="float32", inter=None, seq=0, stochastic=False, feedback=False) -> Config:
    h, d, n, g = sizes["heads"], sizes["dim"], sizes["state"], sizes["groups"]
    return Config(
        num_recurrent_layers=LAYERS,
        max_batch_size=rows,
        recurrent_state_num_heads=h,
        recurrent_state_head_dim=d,
        recurrent_state_size=n,
        n_groups=g,
        mixer=mixer,
        conv_dim=h * d + 2 * g * n if mixer == "mamba2" else 2 * g * d + h * n,
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


def fast_matvec(values, weight):
    return np.matmul(values, weight.astype(values.dtype, copy=False))


@contextlib.contextmanager
def study_arithmetic(wide: bool):
    """BLAS matrix-vector products (both models' modules), float64 arithmetic when ``wide``."""
    saved = mamba2.matvec, gdn.matvec, gdn.F32
    mamba2.matvec = gdn.matvec = fast_matvec
    if wide:
        gdn.F32 = np.float64
    try:
        with float64_arithmetic() if wide else contextlib.nullcontext():
            yield
    finally:
        mamba2.matvec, gdn.matvec, gdn.F32 = saved


def make_model(mixer, sizes):
    cls = mamba2.TinyMamba2 if mixer == "mamba2" else gdn.TinyGatedDeltaNet
    return cls(config(mixer, sizes, 1), vocab_size=VOCAB, seed=3)


def widen(model, mixer, sizes, rows):
    wide = copy.copy(model)
    wide.weights = {k: v.astype(np.float64) for k, v in model.weights.items()}
    wide.config = config(mixer, sizes, rows, "float64")
    return wide


def row_logits(model, tokens, output) -> np.ndarray:
    """``precision_study.logits`` for rows: the layer stack's update against the tied embedding."""
    emb = model.weights["embedding"]
    return (output - emb[tokens]) @ emb.T


def states(cache, rows) -> np.ndarray:
    """``[len(rows), elements]`` float64: every layer's recurrent state of each row."""
    layers = range(cache.get_config().num_recurrent_layers)
    return np.concatenate(
        [cache.get_recurrent_state(i)[rows].astype(np.float64).reshape(len(rows), -1) for i in layers], axis=1
    )


def row_errors(state, reference) -> np.ndarray:
    return np.linalg.norm(state - reference, axis=1) / np.linalg.norm(reference, axis=1)


def store(cache, rows, spec, residuals, position) -> None:
    """Store rows ``rows`` of every pool as ``spec`` does after the token that made them ``position`` long.

    16-bit: ``precision_study.quantise``. 8-bit: ``quant8.store`` with the cache's words; the
    recurrent state whole (with its residual under error feedback), the conv window's new column.
    """
    dtype, stochastic, feedback = spec
    if not quant8.is_quant8(dtype):
        quantise(cache, dtype, stochastic, position, slots=rows)
        return
    for layer in range(LAYERS):
        rec, conv = cache.get_recurrent_state(layer), cache.get_conv_state(layer)
        kw = {"stochastic": stochastic, "seed": SEED, "layer": layer, "position": position}
        if feedback and residuals[layer] is None:  # the residual pool starts at zero
            residuals[layer] = np.zeros(rec[rows].shape, quant8.RESIDUAL_DTYPE)
        q = quant8.store(rec[rows], dtype, residual=residuals[layer] if feedback else None, **kw)
        rec[rows] = quant8.dequantise(q.values, q.scales[..., None])
        residuals[layer] = q.residual
        c = quant8.store(conv[rows], dtype, layout="conv", **kw)  # per-column scales: only the new one is kept
        conv[rows, :, -1] = quant8.dequantise(c.values, quant8.expand_conv_scales(c.scales, conv.shape[1]))[..., -1]


def per_token(model, mixer, sizes, steps, seeds, every, logit_every):
    """Items 1-3: reference, teacher-forced and free-running rows advanced in lockstep."""
    names = list(RUNS)
    runs = len(names)
    tf = {name: np.arange(i * seeds, (i + 1) * seeds) for i, name in enumerate(names)}
    free = {name: rows + runs * seeds for name, rows in tf.items()}
    wide = widen(model, mixer, sizes, seeds)
    ref = NumpyMambaCacheManager(wide.config)
    cache = NumpyMambaCacheManager(config(mixer, sizes, 2 * runs * seeds))
    start = np.random.default_rng(SEED).choice(VOCAB, seeds, replace=False)
    ref_tokens = [start]
    free_tokens = np.tile(start, runs)
    residuals = {name: [None] * LAYERS for name in names}
    free_residuals = {name: [None] * LAYERS for name in names}
    errors = {name: [] for name in names}
    logit_errors = {name: [] for name in names}
    tokens_free, margins = [], []
    for t in range(steps):
        with study_arithmetic(True):
            out = wide.decode_step(ref, ref_tokens[-1])
            ref_logits = row_logits(wide, ref_tokens[-1], out)
        top = np.sort(ref_logits, axis=1)
        margins.append(float(np.min(top[:, -1] - top[:, -2])))
        feed = np.concatenate([np.tile(ref_tokens[-1], runs), free_tokens])
        with study_arithmetic(False):
            out = model.decode_step(cache, feed)
        for name in names:
            store(cache, tf[name], RUNS[name], residuals[name], t + 1)
            store(cache, free[name], RUNS[name], free_residuals[name], t + 1)
        logits = row_logits(model, feed, out).astype(np.float64)
        free_tokens = np.argmax(logits[runs * seeds :], axis=1)
        tokens_free.append(free_tokens.reshape(runs, seeds))
        ref_tokens.append(np.argmax(ref_logits, axis=1))
        if (t + 1) % every == 0:
            reference = states(ref, np.arange(seeds))
            for name in names:
                errors[name].append(row_errors(states(cache, tf[name]), reference).tolist())
        if t % logit_every == 0:
            rms = np.sqrt(np.mean(ref_logits**2, axis=1, keepdims=True))
            for name in names:
                logit_errors[name].append((np.abs(logits[tf[name]] - ref_logits) / rms).astype(np.float32))
    ref_seq = np.stack(ref_tokens[1:])  # [T, S]
    free_seq = np.stack(tokens_free)  # [T, runs, S]
    result = {}
    for i, name in enumerate(names):
        err = np.array(errors[name])  # [T / every, S]
        le = np.concatenate(logit_errors[name]).ravel()
        result[name] = {
            "state_error_median": np.median(err, axis=1).tolist(),
            "state_error_final": err[-1].tolist(),
            "state_error_mean": float(err.mean()),
            "first_divergence_vs_float32": first_divergence(free_seq[:, i], free_seq[:, 0]),
            "first_divergence_vs_float64": first_divergence(free_seq[:, i], ref_seq),
            "logit_error_percentiles": {str(p): float(np.percentile(le, p)) for p in PERCENTILES},
        }
    reference = {
        "start_tokens": start.tolist(),
        "distinct_tokens": [len(set(ref_seq[:, s].tolist())) for s in range(seeds)],
        "top2_logit_margin_min": float(min(margins)),
        "top2_logit_margin_median": float(np.median(margins)),
    }
    return result, reference


def first_divergence(tokens, reference) -> list:
    """Per seed: the first token (1-based) where ``tokens`` ``[T, S]`` differ from ``reference``, or None."""
    out = []
    for s in range(tokens.shape[1]):
        where = np.nonzero(tokens[:, s] != reference[:, s])[0]
        out.append(int(where[0]) + 1 if where.size else None)
    return out


def speculative(model, mixer, sizes, steps, seeds):
    """Item 4: 8-bit main pools (the manager's) with bfloat16 per-step buffers in a verify loop."""
    names = list(MIXED)
    rows = {name: np.arange(i * seeds, (i + 1) * seeds) for i, name in enumerate(names)}
    total = len(names) * seeds
    wide = widen(model, mixer, sizes, seeds)
    ref = NumpyMambaCacheManager(wide.config)
    start = np.random.default_rng(SEED).choice(VOCAB, seeds, replace=False)
    shadow = NumpyMambaCacheManager(config(mixer, sizes, total, inter=bfloat16, seq=VERIFY))
    pools = {
        name: NumpyMambaCacheManager(config(mixer, sizes, seeds, dtype, bfloat16, VERIFY, stochastic, feedback))
        for name, (dtype, stochastic, feedback) in MIXED.items()
        if quant8.is_quant8(dtype)
    }
    accepts = np.random.default_rng(SEED + 1)
    ref_now = NumpyMambaCacheManager(wide.config)  # the reference after the accepted tokens
    ref_tokens = [start]
    position, errors = 0, {name: [] for name in names}
    while position + VERIFY < steps:
        with study_arithmetic(True):  # the reference runs VERIFY tokens ahead: they are the drafts
            while len(ref_tokens) < position + VERIFY + 1:
                out = wide.decode_step(ref, ref_tokens[-1])
                ref_tokens.append(np.argmax(row_logits(wide, ref_tokens[-1], out), axis=1))
        drafts = np.tile(np.stack(ref_tokens[position : position + VERIFY], axis=1), (len(names), 1))
        for name, pool in pools.items():  # the verify pass reads the 8-bit pools as float32
            for layer in range(LAYERS):
                rec, conv = pool.get_recurrent_state(layer), pool.get_conv_state(layer)
                scales = quant8.expand_conv_scales(pool.get_conv_scales(layer), conv.shape[1])
                shadow.get_recurrent_state(layer)[rows[name]] = quant8.dequantise(
                    rec, pool.get_recurrent_scales(layer)[..., None]
                )
                shadow.get_conv_state(layer)[rows[name]] = quant8.dequantise(conv, scales)
        with study_arithmetic(False):
            model.verify(shadow, drafts, positions=np.full(total, position))
        accepted = int(accepts.integers(1, VERIFY + 1))
        for name, pool in pools.items():
            pool.reshape_intermediate_states(seeds, VERIFY)
            for layer in range(LAYERS):
                pool.get_intermediate_recurrent_state(layer)[...] = shadow.get_intermediate_recurrent_state(layer)[
                    rows[name]
                ]
                pool.get_intermediate_conv_state(layer)[...] = shadow.get_intermediate_conv_state(layer)[rows[name]]
            pool.scatter_mtp_states(np.full(seeds, accepted, np.int32), positions=np.full(seeds, position, np.int32))
        shadow.scatter_mtp_states(np.full(total, accepted, np.int32), positions=np.full(total, position, np.int32))
        position += accepted
        with study_arithmetic(True):
            for k in range(position - accepted, position):
                wide.decode_step(ref_now, ref_tokens[k])
        reference = states(ref_now, np.arange(seeds))
        for name in names:
            if name in pools:
                got = np.concatenate(
                    [
                        quant8.dequantise(
                            pools[name].get_recurrent_state(i), pools[name].get_recurrent_scales(i)[..., None]
                        )
                        .astype(np.float64)
                        .reshape(seeds, -1)
                        for i in range(LAYERS)
                    ],
                    axis=1,
                )
            else:
                got = states(shadow, rows[name])
            errors[name].append((position, row_errors(got, reference).tolist()))
    return {
        name: {
            "commits": len(errs),
            "state_error_final": errs[-1][1],
            "state_error_mean": float(np.mean([e for _, e in errs])),
            "state_error_median_series": [[p, float(np.median(e))] for p, e in errs[:: max(1, len(errs) // 200)]],
        }
        for name, errs in errors.items()
    }


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


def svg(result: dict) -> str:
    """Median state error over time, log scale, one panel per model (plain SVG, deterministic)."""
    lo, hi = -9.0, 1.0
    parts = []
    for p, (mixer, title) in enumerate((("mamba2", "TinyMamba2"), ("gdn", "TinyGatedDeltaNet"))):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--logit-every", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant8-study.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "quant8-study.svg"))
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else SIZES
    result = {
        "steps": args.steps,
        "seeds": args.seeds,
        "every": args.every,
        "logit_every": args.logit_every,
        "layers": LAYERS,
        "conv_kernel": KERNEL,
        "vocab": VOCAB,
        "verify_len": VERIFY,
        "models": {},
    }
    for mixer in ("mamba2", "gdn"):
        began = time.process_time()
        model = make_model(mixer, sizes[mixer])
        runs, reference = per_token(model, mixer, sizes[mixer], args.steps, args.seeds, args.every, args.logit_every)
        spec = speculative(model, mixer, sizes[mixer], args.steps, args.seeds)
        result["models"][mixer] = {
            "sizes": sizes[mixer],
            "reference": reference,
            "runs": runs,
            "speculative": spec,
            "cpu_seconds": round(time.process_time() - began, 1),
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
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot = pathlib.Path(args.plot)
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.write_text(svg(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
