"""How much do 16-bit recurrent states cost? A long-generation study on the NumPy tiny model (CPU).

    python benchmarks/precision_study.py [--steps 4000] [--out benchmarks/results] [--plot docs/img/precision-study.svg]

The reference run computes AND stores everything in float64 (the tiny model's arithmetic is
switched to float64 for it, and its float32 weights are widened exactly). The other runs compute
in float32, as the model does, and store the states in:

    float32                      (the compute precision: the floor of every 16-bit run)
    bfloat16 / float16, nearest  (what an astype into a 16-bit pool does)
    bfloat16 / float16, stochastic rounding (mamba_cache.precision, Philox keyed by layer, kind,
                                  token position and element; seed fixed)

A 16-bit store is applied after every token to the whole state (rounding a value that is already
representable leaves it unchanged, so this equals keeping the pools in that dtype).

Measured, for one sequence of ``--steps`` tokens:

1. teacher-forced: every run is fed the reference's greedy tokens; the relative error of the
   recurrent state (Frobenius norm over all layers, vs. float64) is recorded over time;
2. free-running greedy decoding (next token = argmax of the layer stack's update against the tied
   embedding, see ``logits``): the first step at which a run's token differs from the float64 run's;
3. mixed main / per-step dtypes in a speculative loop (V = 4 drafts of the reference's tokens,
   seeded random accept lengths): float32 main pool with bfloat16 per-step states (the commit
   widens exactly, the verify pass stored with nearest), and bfloat16 main with float32 per-step
   states committed with nearest or stochastic rounding (the model's own stores, including the
   verify pass's final state in the main pool, round to nearest); state error vs. float64 along
   the accepted tokens, next to equal dtypes;
4. teacher-forced with one token repeated (the state settles to a fixed point): state error of the
   16-bit runs, nearest vs. stochastic.

Writes ``<out>/precision-study.json`` and an SVG plot of the state error over time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mamba_cache import Config, NumpyMambaCacheManager  # noqa: E402
from mamba_cache.models import mamba2  # noqa: E402
from mamba_cache.precision import bfloat16, convert  # noqa: E402

HEADS, DIM, STATE, LAYERS, KERNEL, VOCAB = 4, 8, 16, 2, 4, 64
RUNS = {
    "float32": ("float32", False),
    "bfloat16 nearest": (bfloat16, False),
    "bfloat16 stochastic": (bfloat16, True),
    "float16 nearest": ("float16", False),
    "float16 stochastic": ("float16", True),
}
SEED = 20261128


def config(dtype="float32", inter=None, seq=0, stochastic=False) -> Config:
    return Config(
        num_recurrent_layers=LAYERS,
        max_batch_size=1,
        recurrent_state_num_heads=HEADS,
        recurrent_state_head_dim=DIM,
        recurrent_state_size=STATE,
        conv_dim=HEADS * DIM + 2 * STATE,
        conv_kernel=KERNEL,
        max_intermediate_seq_len=seq,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=inter,
        stochastic_rounding=stochastic,
        rounding_seed=SEED,
    )


@contextlib.contextmanager
def float64_arithmetic():
    """Run the tiny model's NumPy decode step in float64 (its functions read the module's F32)."""
    saved = mamba2.F32
    mamba2.F32 = np.float64
    try:
        yield
    finally:
        mamba2.F32 = saved


def float64_model(model):
    wide = copy.copy(model)
    wide.weights = {k: v.astype(np.float64) for k, v in model.weights.items()}
    wide.config = config("float64")
    return wide


def logits(model, token: int, output) -> np.ndarray:
    """The layer stack's update (output minus the input embedding) against the tied embedding.

    The random model's residual stream is dominated by the input token's own embedding, whose
    argmax would repeat the token for ever; its update is what depends on the recurrent state.
    """
    return (output[0] - model.weights["embedding"][token]) @ model.weights["embedding"].T


def greedy(model, token: int, output) -> int:
    return int(np.argmax(logits(model, token, output)))


def state_of(cache) -> np.ndarray:
    return np.concatenate([cache.get_recurrent_state(i)[0].astype(np.float64).ravel() for i in range(LAYERS)])


def quantise(cache, dtype, stochastic: bool, position: int, slots=(0,)) -> None:
    """Store every state of ``slots`` as ``dtype`` (then widen back exactly into the float32 pool)."""
    if np.dtype(dtype) == np.float32:
        return
    slots = np.asarray(slots)
    for layer in range(cache.get_config().num_recurrent_layers):
        for kind, view in enumerate((cache.get_recurrent_state(layer), cache.get_conv_state(layer))):
            flat = view[slots].reshape(len(slots), -1)
            rounded = convert(flat, dtype, stochastic=stochastic, seed=SEED, kind=kind, layer=layer, position=position)
            view[slots] = rounded.astype(np.float32).reshape((len(slots), *view.shape[1:]))


def relative_error(state, reference) -> float:
    return float(np.linalg.norm(state - reference) / np.linalg.norm(reference))


def reference_run(model, steps: int, constant: bool = False) -> tuple[list[int], list[np.ndarray], list[float]]:
    """The float64 run: greedy tokens (or token 1 throughout when ``constant``), states, top-2 margins."""
    wide = float64_model(model)
    cache = NumpyMambaCacheManager(config("float64"))
    tokens, states, margins = [1], [], []
    with float64_arithmetic():
        for _ in range(steps):
            out = wide.decode_step(cache, [tokens[-1]])
            top = np.sort(logits(wide, tokens[-1], out))
            tokens.append(1 if constant else greedy(wide, tokens[-1], out))
            states.append(state_of(cache))
            margins.append(float(top[-1] - top[-2]))
    return tokens, states, margins


def teacher_forced(model, tokens, ref_states, dtype, stochastic, every):
    cache = NumpyMambaCacheManager(config())
    errors = []
    for t in range(len(ref_states)):
        model.decode_step(cache, [tokens[t]])
        quantise(cache, dtype, stochastic, t + 1)
        if (t + 1) % every == 0:
            errors.append(relative_error(state_of(cache), ref_states[t]))
    return errors


def first_divergence(model, tokens, dtype, stochastic) -> int | None:
    cache = NumpyMambaCacheManager(config())
    token = tokens[0]
    for t in range(len(tokens) - 1):
        out = model.decode_step(cache, [token])
        quantise(cache, dtype, stochastic, t + 1)
        token = greedy(model, token, out)
        if token != tokens[t + 1]:
            return t + 1
    return None


def speculative(model, tokens, ref_states, main, inter, stochastic, rng, verify_len=4):
    """Verify V drafts of the reference tokens, commit a random accepted prefix; error per commit."""
    cache = NumpyMambaCacheManager(config(main, inter, verify_len, stochastic))
    position, errors = 0, []
    while position + verify_len < len(ref_states):
        drafts = np.array([tokens[position : position + verify_len]])
        model.verify(cache, drafts)  # the model (built without stochastic rounding) stores to nearest
        accepted = int(rng.integers(1, verify_len + 1))
        # a full accept keeps the verify pass's final state in the main pool; a partial one commits
        cache.scatter_mtp_states(np.array([accepted], np.int32), positions=np.array([position], np.int32))
        position += accepted
        errors.append((position, relative_error(state_of(cache), ref_states[position - 1])))
    return errors


MIXED = {
    "float32 main, bfloat16 per-step (nearest)": ("float32", bfloat16, False),
    "bfloat16 main, float32 per-step, nearest commit": (bfloat16, "float32", False),
    "bfloat16 main, float32 per-step, stochastic commit": (bfloat16, "float32", True),
    "float32 main and per-step": ("float32", "float32", False),
    "bfloat16 main and per-step": (bfloat16, bfloat16, False),
}


def plot(result: dict, path: pathlib.Path) -> None:
    """State error over time, log scale (matplotlib, Agg; deterministic SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "mamba_cache"
    import matplotlib.pyplot as plt

    every = result["every"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in result["runs"].items():
        steps = [every * (i + 1) for i in range(len(run["state_error"]))]
        ax.plot(steps, run["state_error"], label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("tokens decoded (teacher-forced)")
    ax.set_ylabel("relative recurrent-state error vs float64")
    ax.set_title("Tiny Mamba2: stored-state precision over a long generation")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "precision-study.svg"))
    args = parser.parse_args(argv)
    model = mamba2.TinyMamba2(config(), vocab_size=VOCAB, seed=3)
    tokens, ref_states, margins = reference_run(model, args.steps)
    result = {
        "steps": args.steps,
        "every": args.every,
        "model": repr(config()),
        "reference_tokens": {
            "distinct": len(set(tokens)),
            "top2_logit_margin_min": min(margins),
            "top2_logit_margin_median": float(np.median(margins)),
        },
        "runs": {},
    }
    print("reference greedy tokens:", result["reference_tokens"])
    for name, (dtype, stochastic) in RUNS.items():
        errors = teacher_forced(model, tokens, ref_states, dtype, stochastic, args.every)
        diverged = first_divergence(model, tokens, dtype, stochastic)
        result["runs"][name] = {
            "state_error": errors,
            "final_error": errors[-1],
            "mean_error": float(np.mean(errors)),
            "first_divergent_token": diverged,
        }
        print(f"{name:<22} final {errors[-1]:.2e} mean {np.mean(errors):.2e} first divergent token {diverged}")
    rng = np.random.default_rng(SEED)
    accept_seed = int(rng.integers(2**31))
    result["speculative"] = {}
    for name, (main_dtype, inter, stochastic) in MIXED.items():
        accepts = np.random.default_rng(accept_seed)  # the same accept lengths for every variant
        errors = speculative(model, tokens, ref_states, main_dtype, inter, stochastic, accepts)
        values = [e for _, e in errors]
        result["speculative"][name] = {
            "final_error": values[-1],
            "mean_error": float(np.mean(values)),
            "commits": len(values),
        }
        print(f"{name:<52} final {values[-1]:.2e} mean {np.mean(values):.2e}")
    # 4. a constant input: the state settles to a fixed point, where each token's update is smaller
    #    than half a bfloat16 place and nearest rounding can stagnate
    const_tokens, const_states, _ = reference_run(model, args.steps, constant=True)
    result["constant_input"] = {}
    for name in ("bfloat16 nearest", "bfloat16 stochastic", "float16 nearest", "float16 stochastic"):
        dtype, stochastic = RUNS[name]
        errors = teacher_forced(model, const_tokens, const_states, dtype, stochastic, args.every)
        result["constant_input"][name] = {"final_error": errors[-1], "mean_error": float(np.mean(errors))}
        print(f"constant input {name:<22} final {errors[-1]:.2e} mean {np.mean(errors):.2e}")
    plot(result, pathlib.Path(args.plot))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision-study.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
