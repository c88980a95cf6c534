"""How far does a chunked prefill's checkpoint sit from the per-token decode's state? The tolerance table's numbers.

    python benchmarks/chunked_tolerance.py [--seeds 20] [--tokens 40] [--backend numpy]

For each mixer (Mamba2 with G = 2 groups, Gated DeltaNet with G = 2 key heads), state dtype and seed:
a random-weight tiny model (2 layers, H = 4, D = 4, N = 8, K = 4) decodes a random prompt of
``--tokens`` tokens one token at a time, recording every layer's recurrent state and conv window after
each token, then 6 more tokens. Then, for each chunk size (1, 5, 8, 16 and one longer than the
prompt), ``prefill_chunked`` runs the prompt once with a checkpoint at EVERY position into reserved
store entries (block size 1, so every position can be published and matched with the store as it is);
each checkpoint is compared with the per-token state at its position; the prefill's outputs with the
per-token outputs; and for 4 random positions the entry is published, matched, restored into another
slot and the rest of the prompt plus the 6 tokens decoded token by token, whose outputs are compared
with those of the whole per-token run. Every comparison is
[`deviation`][mamba_cache.models.chunked.deviation] (largest absolute difference over one layer's
state, window or output, divided by the reference's largest magnitude); the table prints the largest
over everything, next to the library's ``CHUNKED_TOLERANCE`` and the margin between them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager, select_numba_target
from mamba_cache.models.chunked import CHUNKED_TOLERANCE, deviation
from mamba_cache.models.gdn import TinyGatedDeltaNet
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.prefix import PrefixStateCache

KINDS = ("recurrent", "conv", "prefill output", "decode output")


def config_for(mixer: str, dtype: str, batch: int = 2, **overrides) -> Config:
    """The measured shape: 2 layers, H = 4 heads in G = 2 groups, D = 4, N = 8, K = 4 (``overrides``: more fields)."""
    groups, heads, dim, size = 2, 4, 4, 8
    channels = heads * dim + 2 * groups * size if mixer == "mamba2" else 2 * groups * dim + heads * size
    return Config(
        num_recurrent_layers=2,
        max_batch_size=batch,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=size,
        conv_dim=channels,
        conv_kernel=4,
        max_intermediate_seq_len=1,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        n_groups=groups,
        mixer=mixer,
        **overrides,
    )


def host(array, dtype=None) -> np.ndarray:
    """A host copy; ``dtype`` reads a Numba bfloat16 pool's raw uint16 bits as bfloat16."""
    copy = array.copy() if isinstance(array, np.ndarray) else array.copy_to_host()
    if dtype is not None and copy.dtype != dtype and copy.dtype.itemsize == np.dtype(dtype).itemsize:
        return copy.view(dtype)
    return copy


def per_token(model, manager_type, config, tokens: np.ndarray) -> tuple:
    """Per-token decode of ``tokens`` in slot 0 of a fresh cache: ``states[p]`` (``p >= 1``) per layer ``(rec, conv)``
    after ``p`` tokens, and the outputs ``[len(tokens), M]``."""
    cache = manager_type(config)
    states, outputs = [None], []
    for token in tokens:
        outputs.append(host(model.decode_step(cache, [token], slots=[0], positions=[len(outputs)]))[0])
        layers = range(config.num_recurrent_layers)
        states.append(
            [
                (host(cache.get_recurrent_state(i)[0], config.recurrent_state_dtype),
                 host(cache.get_conv_state(i)[0], config.conv_state_dtype))
                for i in layers
            ]
        )  # fmt: skip
    return states, np.stack(outputs)


def measure(mixer: str, dtype: str, seed: int, count: int, manager_type, chunks=(1, 5, 8, 16, None)) -> dict:
    """Largest deviation of each kind (``KINDS``) over every chunk size, position and layer for one seed."""
    config = config_for(mixer, dtype)
    model = (TinyMamba2 if mixer == "mamba2" else TinyGatedDeltaNet)(config, vocab_size=32, seed=seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 32, count)
    extra = rng.integers(0, 32, 6)
    want_states, want_out = per_token(model, manager_type, config, np.concatenate([prompt, extra]))
    worst = dict.fromkeys(KINDS, 0.0)
    layers = range(config.num_recurrent_layers)
    for chunk in chunks:
        cache = manager_type(config)
        store = PrefixStateCache(cache, entries=count, block_size=1)
        positions = np.arange(1, count + 1)
        entries = [store.reserve() for _ in positions]
        out = host(model.prefill_chunked(cache, prompt, 0, chunk_size=chunk or count + 3, checkpoints=positions,
                                         store=store, entries=entries))  # fmt: skip
        worst["prefill output"] = max(worst["prefill output"], deviation(out, want_out[:count]))
        for p, entry in zip(positions, entries, strict=True):
            rec, conv = (host(pool, config.recurrent_state_dtype) for pool in store.entry_state(entry))
            for layer in layers:
                worst["recurrent"] = max(worst["recurrent"], deviation(rec[layer], want_states[p][layer][0]))
                worst["conv"] = max(worst["conv"], deviation(conv[layer], want_states[p][layer][1]))
            store.publish(entry, prompt[:p])
        for p in rng.choice(positions[:-1], size=4, replace=False):
            handle = store.match(np.concatenate([prompt[:p], [0]]))
            assert handle is not None and handle.length == p
            store.restore(handle, 1)
            rest = np.concatenate([prompt[p:], extra])
            got = np.stack([host(model.decode_step(cache, [t], slots=[1]))[0] for t in rest])
            worst["decode output"] = max(worst["decode output"], deviation(got, want_out[p:]))
        store.close()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--backend", choices=("numpy", "numba"), default="numpy")
    args = parser.parse_args()
    if args.backend == "numba":
        select_numba_target()
    manager_type = NumpyMambaCacheManager if args.backend == "numpy" else NumbaMambaCacheManager
    print(f"backend {args.backend}, {args.seeds} seeds, {args.tokens} tokens, chunk sizes 1, 5, 8, 16, T + 3")
    print("| mixer | state dtype | kind | largest measured | tolerance | margin |")
    print("|---|---|---|---|---|---|")
    for mixer, dtypes in (
        ("mamba2", ("float32", "float64", "float16", "bfloat16")),
        ("gdn", ("float32", "float64", "float16")),
    ):
        for dtype in dtypes:
            began = time.perf_counter()
            worst = dict.fromkeys(KINDS, 0.0)
            for seed in range(args.seeds):
                for kind, value in measure(mixer, dtype, seed, args.tokens, manager_type).items():
                    worst[kind] = max(worst[kind], value)
            for kind in KINDS:
                limit = CHUNKED_TOLERANCE[dtype][kind]
                margin = f"{limit / worst[kind]:.1f}x" if worst[kind] else "exact"
                print(f"| {mixer} | {dtype} | {kind} | {worst[kind]:.2e} | {limit:.0e} | {margin} |")
            print(f"<!-- {mixer} {dtype}: {time.perf_counter() - began:.1f} s -->")


if __name__ == "__main__":
    main()
