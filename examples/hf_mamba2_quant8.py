"""Hugging Face ``transformers``' Mamba2 decoding with its states stored in mamba_cache's 8-bit pools.

The model (``Mamba2ForCausalLM`` from a small random ``Mamba2Config`` whose state size is the real
models' N = 128; CPU; nothing downloaded) decodes one token at a time through its own code. Its cache
tensors are float32 working states that live in the library's per-step buffers (step 0 of
``get_intermediate_conv_state`` / ``get_intermediate_recurrent_state``, zero copy). Each token:

1. the working states are set to what the main pool holds, read back as float32 (for an 8-bit
   pool ``quant8.dequantise`` of its values with their scales);
2. the model decodes the token, updating the working states in place;
3. ``scatter_mtp_states`` with one accepted step commits them into the main pool: the library's own
   commit (8-bit: a scale per ``(head, d)`` row of N, the new conv column with its own scales per 64
   channels and the older columns moved, never re-rounded; stochastic rounding keyed by the token
   position; error-feedback residuals).

So the model always reads what the pool holds, and only the library writes the pool. The prompt goes
through the same steps, one token at a time, so every conv column enters the pool through a commit.
A float32 pool (its commit an exact copy) is the baseline, a bfloat16 pool the 16-bit yardstick.

``study`` runs every pool of ``RUNS`` in lockstep over ``steps`` generated tokens for ``batch`` prompts
(rows) and measures:

- teacher-forced (every run fed the float32 run's greedy tokens): the relative error of all layers'
  recurrent states vs the float32 run's (Frobenius, per row, after each token), and the share of
  tokens whose greedy choice equals the float32 run's;
- free-running greedy decoding: the first generated token that differs from the float32 run's.

Run: ``python examples/hf_mamba2_quant8.py [--steps 300] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; make sure nothing is looked up

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script from a checkout: import this checkout's mamba_cache
    sys.path.insert(0, str(HERE.parent))

from mamba_cache import Config, NumpyMambaCacheManager  # noqa: E402
from mamba_cache.precision import quant8  # noqa: E402

#: name -> (main pool dtype, stochastic rounding, error feedback)
RUNS = {
    "float32": ("float32", False, False),
    "bfloat16 nearest": ("bfloat16", False, False),
    "e4m3 nearest": ("float8_e4m3fn", False, False),
    "e4m3 stochastic": ("float8_e4m3fn", True, False),
    "e5m2 nearest": ("float8_e5m2", False, False),
    "e5m2 stochastic": ("float8_e5m2", True, False),
    "int8 nearest": ("int8", False, False),
    "int8 stochastic": ("int8", True, False),
    "int8 nearest + error feedback": ("int8", False, True),
    "int8 stochastic + error feedback": ("int8", True, True),
}
SEED = 20261128


def _hf_example():
    """``examples/hf_mamba2.py`` (the cache plumbing: the model's cache object over given tensors, forward)."""
    spec = importlib.util.spec_from_file_location("hf_mamba2_example", HERE / "hf_mamba2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def study_config(vocab_size: int = 256, layers: int = 2, heads: int = 8, head_dim: int = 32, state: int = 128):
    """A small random ``Mamba2Config`` with N = ``state`` (the real models' 128 by default), one B/C group."""
    return _hf_example().tiny_config(vocab_size, layers, heads, head_dim, state)


class PooledStates:
    """One run's states: a main pool of ``dtype`` and the float32 working states the model decodes in."""

    def __init__(self, hf, model, batch: int, spec) -> None:
        dtype, stochastic, feedback = spec
        self.example = hf
        config = model.config
        self.manager = NumpyMambaCacheManager(
            Config(
                num_recurrent_layers=config.num_hidden_layers,
                max_batch_size=batch,
                recurrent_state_num_heads=config.num_heads,
                recurrent_state_head_dim=config.head_dim,
                recurrent_state_size=config.state_size,
                n_groups=config.n_groups,
                conv_dim=config.num_heads * config.head_dim + 2 * config.n_groups * config.state_size,
                conv_kernel=config.conv_kernel,
                max_intermediate_seq_len=1,
                recurrent_state_dtype=dtype,
                conv_state_dtype=dtype,
                intermediate_recurrent_state_dtype="float32",
                intermediate_conv_state_dtype="float32",
                stochastic_rounding=stochastic,
                error_feedback=feedback,
                rounding_seed=SEED,
                verify_writes_main_pool=False,  # the pool is written by commits only
            )
        )
        self.batch, self.layers = batch, config.num_hidden_layers
        self.manager.reshape_intermediate_states(batch, 1)
        self.work_conv = [self.manager.get_intermediate_conv_state(i)[:, 0] for i in range(self.layers)]
        self.work_rec = [self.manager.get_intermediate_recurrent_state(i)[:, 0] for i in range(self.layers)]
        self.conv = [hf.as_torch(view) for view in self.work_conv]
        self.rec = [hf.as_torch(view) for view in self.work_rec]
        self.cache = hf.hf_cache_over(model, self.conv, self.rec)

    def read(self, layer: int):
        """``(conv [B, C, K], recurrent [B, H, D, N])`` float32: what the main pool holds, as it reads back."""
        m = self.manager
        conv, rec = m.get_conv_state(layer), m.get_recurrent_state(layer)
        if not quant8.is_quant8(rec.dtype):
            return conv.astype(np.float32), rec.astype(np.float32)
        scales = quant8.expand_conv_scales(m.get_conv_scales(layer), conv.shape[1])
        return quant8.dequantise(conv, scales), quant8.dequantise(rec, m.get_recurrent_scales(layer)[..., None])

    def step(self, model, tokens, position: int):
        """Decode ``tokens`` ``[B]`` (torch int64) from the pool's states, commit; the logits ``[B, V]``."""
        for i in range(self.layers):
            self.work_conv[i][...], self.work_rec[i][...] = self.read(i)
        logits = self.example.forward(model, tokens[:, None], self.cache, position)
        self.example._assert_shared(self.cache, self.conv, self.rec)  # the model wrote the library's memory
        self.manager.scatter_mtp_states(
            np.ones(self.batch, np.int32), positions=np.full(self.batch, position, np.int32)
        )
        return logits

    def states(self) -> np.ndarray:
        """``[B, elements]`` float64: every layer's recurrent state as the pool holds it."""
        return np.concatenate([self.read(i)[1].reshape(self.batch, -1) for i in range(self.layers)], axis=1).astype(
            np.float64
        )


def study(steps: int = 300, batch: int = 3, prompt_len: int = 8, seed: int = 0, runs=None, config=None) -> dict:
    """Decode with every pool of ``runs`` (default ``RUNS``) in lockstep; the measures of the module docstring.

    Returns:
        ``{"config": ..., "runs": {name: {"state_error_mean", "state_error_final" (per row),
        "teacher_forced_agreement", "first_divergence" (per row, 1-based, or None)}}}``.
    """
    import torch
    from transformers import Mamba2ForCausalLM

    hf = _hf_example()
    runs = RUNS if runs is None else runs
    torch.manual_seed(seed)
    config = study_config() if config is None else config
    model = Mamba2ForCausalLM(config).eval()
    prompt = torch.from_numpy(np.random.default_rng(seed).integers(1, config.vocab_size, (batch, prompt_len)))
    forced = {name: PooledStates(hf, model, batch, spec) for name, spec in runs.items()}
    free = {name: PooledStates(hf, model, batch, spec) for name, spec in runs.items() if name != "float32"}
    free_tokens = {name: None for name in free}
    errors = {name: [] for name in runs}
    agree = {name: [] for name in runs}
    diverged = {name: [None] * batch for name in free}
    reference = None
    for t in range(prompt_len + steps - 1):
        given = t < prompt_len
        feed = prompt[:, t] if given else reference
        logits = {name: run.step(model, feed, t) for name, run in forced.items()}
        choice = {name: value.argmax(-1) for name, value in logits.items()}
        for name, run in free.items():
            mine = prompt[:, t] if given else free_tokens[name]
            free_tokens[name] = run.step(model, mine, t).argmax(-1)
        if t + 1 < prompt_len:
            continue
        reference = choice["float32"]  # the float32 run's next token: what every teacher-forced run is fed
        base = forced["float32"].states()
        for name, run in forced.items():
            diff = run.states() - base
            errors[name].append(np.linalg.norm(diff, axis=1) / np.linalg.norm(base, axis=1))
            agree[name].append((choice[name] == reference).numpy())
        generated = t + 2 - prompt_len  # 1-based index of the token just chosen
        for name in free:
            for b in np.nonzero((free_tokens[name] != reference).numpy())[0]:
                if diverged[name][b] is None:
                    diverged[name][b] = generated
            free_tokens[name] = torch.where(  # a free run that has diverged keeps its own tokens
                torch.tensor([d is None for d in diverged[name]]), reference, free_tokens[name]
            )
    out = {}
    for name in runs:
        err = np.array(errors[name])  # [steps, B]
        out[name] = {
            "state_error_mean": float(err.mean()),
            "state_error_final": err[-1].tolist(),
            "teacher_forced_agreement": float(np.mean(agree[name])),
            "first_divergence": diverged.get(name, [None] * batch),
        }
    shape = {
        k: getattr(config, k)
        for k in ("num_hidden_layers", "hidden_size", "num_heads", "head_dim", "state_size", "vocab_size")
    }
    return {"config": shape, "steps": steps, "batch": batch, "prompt_len": prompt_len, "seed": seed, "runs": out}


def main() -> None:
    """Command line: run the study, print a table, write the results (``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    result = study(args.steps, args.batch, seed=args.seed)
    print(f"{result['config']}, {args.steps} tokens, {args.batch} rows")
    print(f"{'pool':<34} {'state error mean':>16} {'final (rows)':>28} {'agreement':>10}  first divergence")
    for name, run in result["runs"].items():
        final = ", ".join(f"{e:.1e}" for e in run["state_error_final"])
        print(
            f"{name:<34} {run['state_error_mean']:>16.2e} {final:>28} {run['teacher_forced_agreement']:>10.3f}"
            f"  {run['first_divergence']}"
        )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
