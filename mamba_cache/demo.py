"""A short demonstration: ``python -m mamba_cache.demo`` (or ``make demo``).

Builds a cache for a Mamba2-370M-sized model on the best available backend (the Numba backend
on a GPU, else the NumPy reference), plays one speculative-decoding verify step through the
intermediate states and commits it with ``scatter_mtp_states``, prints the layouts and the memory
table, and checks every slot of every layer against the rule computed independently, row by row.
Then a small Mamba2 model (``mamba_cache.models.mamba2``) decodes speculatively on the same
backend, and the committed states are checked against decoding only the accepted tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from mamba_cache import Config, ConfigError, NumpyMambaCacheManager, gpu_present

#: Mamba2-370M: 48 layers, d_inner 2048 = 32 heads x 64, d_state 128, conv over x, B and C
#: (2048 + 2 * 128 = 2304 channels), kernel 4; batch 4, verify 4 tokens (MTP).
DEMO_CONFIG = Config(
    num_recurrent_layers=48,
    max_batch_size=4,
    recurrent_state_num_heads=32,
    recurrent_state_head_dim=64,
    recurrent_state_size=128,
    conv_dim=2304,
    conv_kernel=4,
    max_intermediate_seq_len=4,
)


class BackendUnavailable(RuntimeError):
    """``--backend numba`` where Numba or a CUDA GPU is missing."""


def pick_backend(name: str):
    """Return (manager class, description) for ``name`` in {auto, numpy, numba}.

    Raises:
        BackendUnavailable: ``numba`` without Numba installed, or without a CUDA GPU (unless
            ``NUMBA_ENABLE_CUDASIM=1`` asks for Numba's CUDA simulator).
    """
    if name == "numba" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not gpu_present():
        raise BackendUnavailable(
            "--backend numba needs a CUDA GPU and none was found (no CUDA driver or no device); "
            "use --backend numpy or auto, or set NUMBA_ENABLE_CUDASIM=1 for Numba's (slow) CUDA simulator"
        )
    if name in ("auto", "numba"):
        try:
            from numba import cuda

            if cuda.is_available() or name == "numba":
                from mamba_cache.core.numba_backend import NumbaMambaCacheManager, device_name

                return NumbaMambaCacheManager, f"Numba CUDA backend on {device_name()}"
        except ImportError as error:
            if name == "numba":
                raise BackendUnavailable(f"--backend numba needs Numba: {error}") from error
    return NumpyMambaCacheManager, "NumPy reference backend (no GPU found)"


def _upload(view, values):
    if isinstance(view, np.ndarray):
        view[...] = values
    else:
        view.copy_to_device(values)


def _host(view):
    return view if isinstance(view, np.ndarray) else view.copy_to_host()


def model_check(manager_class, rng) -> bool:
    """TinyMamba2 on the cache: verify + scatter must leave the bits sequential decoding leaves."""
    from mamba_cache.models.mamba2 import TinyMamba2

    heads, dim, state = 8, 32, 32
    config = Config(
        num_recurrent_layers=4,
        max_batch_size=4,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=state,
        conv_dim=heads * dim + 2 * state,
        conv_kernel=4,
        max_intermediate_seq_len=4,
    )
    model = TinyMamba2(config, vocab_size=256, seed=int(rng.integers(1 << 30)))
    spec, seq = manager_class(config), manager_class(config)
    prompt = rng.integers(0, 256, size=(4, 8))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    for _ in range(3):
        drafts = rng.integers(0, 256, size=(4, 4))
        accept = rng.integers(1, 5, size=4).astype(np.int32)
        model.verify(spec, drafts)
        if manager_class is NumpyMambaCacheManager:
            spec.scatter_mtp_states(accept)
        else:
            from numba import cuda

            spec.scatter_mtp_states(cuda.to_device(accept))
        model.decode_accepted(seq, drafts, accept)
        print(f"  TinyMamba2 verify of 4 drafts x 4 rows, accept_lengths={accept.tolist()} -> scatter")
    return all(
        _host(getattr(spec, f"get_{kind}_state")(layer)).tobytes()
        == _host(getattr(seq, f"get_{kind}_state")(layer)).tobytes()
        for layer in range(config.num_recurrent_layers)
        for kind in ("recurrent", "conv")
    )


def main(argv=None) -> int:
    """Run the demo (``--backend``, ``--check`` ...); return the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "numpy", "numba"], default="auto")
    parser.add_argument("--layers", type=int, default=DEMO_CONFIG.num_recurrent_layers)
    args = parser.parse_args(argv)
    try:  # bad input: one line on stderr, exit status 2, before anything is printed
        config = Config(**{**DEMO_CONFIG.__dict__, "num_recurrent_layers": args.layers})
        if not config.enabled:
            raise ConfigError(f"--layers must be >= 1, got {args.layers}")
        manager_class, description = pick_backend(args.backend)
    except (ConfigError, BackendUnavailable) as error:
        print(f"mamba-cache demo: {error}", file=sys.stderr)
        return 2
    rng = np.random.default_rng()
    print(f"mamba_cache demo: {description}")
    print(
        f"cache sized like Mamba2-370M: {config.num_recurrent_layers} recurrent layers, "
        f"{config.recurrent_state_num_heads} heads x {config.recurrent_state_head_dim}, d_state "
        f"{config.recurrent_state_size}, conv {config.conv_dim} channels x {config.conv_kernel}; "
        f"batch {config.max_batch_size}, MTP verify length {config.max_intermediate_seq_len}\n"
    )
    print(config.memory_table(), "\n")

    timed = 0.0  # seconds in cache operations only (filling with random data and checking are not timed)
    t0 = time.perf_counter()
    cache = manager_class(config)
    timed += time.perf_counter() - t0
    layer0 = {
        "recurrent": cache.get_recurrent_state(0),
        "conv": cache.get_conv_state(0),
        "intermediate_recurrent": cache.get_intermediate_recurrent_state(0),
        "intermediate_conv": cache.get_intermediate_conv_state(0),
    }
    for name, view in layer0.items():
        print(f"  layer 0 {name:<24} {list(view.shape)}  {view.dtype}")

    # Prefill wrote every slot's state; the verify pass of 3 active rows x V = 4 draft tokens
    # wrote the state after each token into the intermediate buffers.
    active, verify = 3, 4
    t0 = time.perf_counter()
    cache.reshape_intermediate_states(active, verify)
    timed += time.perf_counter() - t0
    truth = {}
    for layer in range(config.num_recurrent_layers):
        for kind in ("recurrent", "conv"):
            main = getattr(cache, f"get_{kind}_state")(layer)
            inter = getattr(cache, f"get_intermediate_{kind}_state")(layer)
            main_values = rng.standard_normal(main.shape).astype(main.dtype)
            inter_values = rng.standard_normal(inter.shape).astype(inter.dtype)
            _upload(main, main_values)
            _upload(inter, inter_values)
            truth[kind, layer] = (main_values, inter_values)

    # Row 0 accepted 2 tokens, row 1 all 4 (the pool already holds its final state), row 2 is padding.
    accept = np.array([2, 4, 0], dtype=np.int32)
    if manager_class is not NumpyMambaCacheManager:
        from numba import cuda

        accept_device = cuda.to_device(accept)
        cuda.synchronize()
        t0 = time.perf_counter()
        cache.scatter_mtp_states(accept_device)
        cuda.synchronize()
    else:
        t0 = time.perf_counter()
        cache.scatter_mtp_states(accept)
    scatter_s = time.perf_counter() - t0
    timed += scatter_s
    print(f"\n  verify: active={active}, V={verify}, accept_lengths={accept.tolist()} -> scatter_mtp_states")
    print(
        "  the rule: a row with 1 <= accept_lengths < V takes its intermediate state accept_lengths - 1 into its slot;"
        "\n  a row that accepted all V drafts (its pool already holds its last state) or 0 (padding) keeps its slot,"
        "\n  and so do the slots past the active rows"
    )

    mismatches = 0
    for (kind, layer), (main_values, inter_values) in truth.items():
        expected = main_values.copy()
        for row, accepted in enumerate(accept):
            if 1 <= accepted < verify:
                expected[row] = inter_values[row, accepted - 1]
        got = _host(getattr(cache, f"get_{kind}_state")(layer))
        mismatches += int(got.tobytes() != expected.tobytes())
    t0 = time.perf_counter()
    snapshot = cache.capture_recurrent_states(0)
    cache.clear_states()
    timed += time.perf_counter() - t0
    captured_ok = _host(snapshot[0]).tobytes() == truth["recurrent", 0][1][0, 1].tobytes()
    cleared = not _host(cache.get_recurrent_state(0)).any()
    print(f"  captured slot 0 for a system-prompt cache: {len(snapshot)} x {list(snapshot[0].shape)}, clear_states()")
    print(f"\n  {2 * config.num_recurrent_layers} layer tensors checked against the rule: {mismatches} mismatches")
    print(f"  capture independent of the pool: {captured_ok}; pools zero after clear: {cleared}")
    print(
        f"  cache operations (allocate, reshape, one scatter_mtp_states over {config.num_recurrent_layers} layers, "
        f"capture, clear) took {timed * 1e3:.1f} ms, the scatter {scatter_s * 1e3:.2f} ms;\n"
        "  filling the pools with random states and checking them are not timed\n"
    )
    model_ok = model_check(manager_class, rng)
    print(f"  speculative decoding + scatter == decoding only the accepted tokens, bit for bit: {model_ok}")
    ok = mismatches == 0 and captured_ok and cleared and model_ok
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
