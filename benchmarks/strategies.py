"""Scatter, replay and checkpoint: the state path of each commit mode, timed on a GPU.

    python benchmarks/strategies.py [--out benchmarks/results] [--batches 1,8,32,128,256] [--layers 4]

Needs a CUDA GPU and PyTorch (the event timing and the copy ceiling come from benchmarks/run.py).
For plain decoding (V = 1) and speculative decoding (V = 4, accept lengths uniform on 1..4), batch 1 to
256, at the Nemotron-H-8B (Mamba2, G = 8, float16 state) and Qwen3-Next (Gated DeltaNet, float32 state)
layer sizes, and for each commit mode (checkpoint mode at R = S and at the R with the fewest bytes per
token, `mamba_cache.traffic.best_history_len`), it times the state path alone:

- the verify pass's state traffic: a kernel that reads and writes exactly what the mode's verify pass
  must (the state; the history steps before the window in checkpoint mode; the V per-step states in
  scatter mode, the V stash or ring steps otherwise), one launch per pass over all layers. The
  recurrence's arithmetic is not in it: checkpoint mode's verify pass also recomputes the ``h`` history
  steps before its window, which the table counts as ``replayed_steps_per_token``;
- the commit, by the library: ``scatter_mtp_states``, ``replay_mtp_states`` or ``checkpoint_mtp_states``
  (which folds only when the ring is full). Plain decoding in scatter mode steps the state in place: a
  read and a write of the state, no commit.

Both run on the manager's stream, 16 passes between two events (after a sleep kernel), median of 7;
``us_per_token`` is that device time over the tokens the passes accepted, per layer; ``bytes_per_token``
is `mamba_cache.traffic`'s count for the same accept lengths, per layer. The copy ceiling (an eager 2 GiB
device-to-device copy) is measured in the same run; each fold is also timed alone against it.
It prints a table and writes a new ``<out>/strategies-<card>-<date>.json`` (records ``strategy``).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from numba import cuda  # noqa: E402

from mamba_cache import Config, NumbaMambaCacheManager  # noqa: E402
from mamba_cache.presets import PRESETS  # noqa: E402
from mamba_cache.traffic import best_history_len, state_traffic  # noqa: E402

PRESET_NAMES = ("nemotron-h-8b", "qwen3-next-80b-a3b")
PASSES = 16
WORD = 4  # the traffic kernel moves 4-byte words


@cuda.jit
def traffic(src, read_words, dst, write_start, write_words, sink):
    """Per (layer, row): read ``read_words[b]`` words of ``src[l, b]``, write ``write_words`` of ``dst[l, b]``.

    Grid: (chunks, rows, layers); ``write_start[b]`` is the first word written (a ring position). The
    reads fold into ``sink`` so no read is dead; the writes store the word index (any value moves the
    same bytes).
    """
    layer, row = cuda.blockIdx.z, cuda.blockIdx.y
    start = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
    stride = cuda.blockDim.x * cuda.gridDim.x
    acc = np.uint32(0)
    for i in range(start, read_words[row], stride):
        acc ^= src[layer, row, i]
    first = write_start[row]
    for i in range(start, write_words, stride):
        dst[layer, row, first + i] = np.uint32(i)
    if acc == np.uint32(0x9E3779B9):  # practically never: keeps the reads without a store per thread
        sink[0] = acc


@dataclasses.dataclass
class Case:
    """One timed configuration."""

    preset: str
    strategy: str
    verify: int
    batch: int
    history_len: int
    config: Config


def preset_config(name: str, layers: int, batch: int, verify: int, strategy: str, ring: int = 0) -> Config:
    config = PRESETS[name].config(batch=batch, mtp=verify, commit_mode=strategy)
    config = dataclasses.replace(config, num_recurrent_layers=layers)
    if strategy == "checkpoint":
        config = dataclasses.replace(config, history_len=ring)
    if strategy == "scatter":
        config = dataclasses.replace(config, verify_writes_main_pool=False)
    return config


def accept_run(rng, verify: int, batch: int) -> np.ndarray:
    """``[PASSES, batch]`` accept lengths: all 1 for plain decoding, else uniform on 1..V."""
    return np.ones((PASSES, batch), np.int32) if verify == 1 else rng.integers(1, verify + 1, (PASSES, batch), np.int32)


def cases(layers: int, batches, rng) -> list[tuple[Case, np.ndarray]]:
    out = []
    for name in PRESET_NAMES:
        for verify in (1, 4):
            base = preset_config(name, layers, 1, verify, "replay")
            long_run = accept_run(rng, verify, 2000 // PASSES).ravel().tolist()
            best = best_history_len(base, long_run, candidates=range(verify, 33 * verify)).history_len
            for batch in batches:
                accepts = accept_run(rng, verify, batch)
                for strategy, ring in (("scatter", 0), ("replay", 0), ("checkpoint", verify), ("checkpoint", best)):
                    config = preset_config(name, layers, batch, verify, strategy, ring)
                    out.append((Case(name, strategy, verify, batch, ring, config), accepts))
    return out


def word_counts(config: Config, strategy: str, verify: int) -> tuple[int, int, int]:
    """(state words, per-step words the verify pass writes, step words of the stash / ring) per layer and row."""
    pools = config.pool_bytes()
    layers, slots = config.num_recurrent_layers, config.max_batch_size
    state = (pools["recurrent"] + pools["conv"]) // (layers * slots * WORD)
    step = config.stash_step_bytes // WORD + 1
    per_step = state if strategy == "scatter" else step
    return state, per_step, step


class VerifyTraffic:
    """The buffers and launches of one mode's verify-pass traffic, for all layers and rows.

    ``hs``: each pass's history steps per row before its window (`cursor`). Everything a launch needs
    is on the device before timing starts: a timed pass launches one kernel and copies nothing.
    """

    def __init__(self, case: Case, hs: list[np.ndarray], stream) -> None:
        config, verify = case.config, case.verify
        self.state, self.per_step, self.step = word_counts(config, case.strategy, verify)
        layers, batch = config.num_recurrent_layers, case.batch
        history = case.history_len if case.strategy == "checkpoint" else 0
        self.src = cuda.to_device(np.ones((layers, batch, self.state + history * self.step), np.uint32), stream=stream)
        width = verify * self.per_step + history * self.step
        self.dst = cuda.device_array((layers, batch, max(width, self.state)), np.uint32, stream=stream)
        self.sink = cuda.device_array(1, np.uint32, stream=stream)
        self.stream = stream
        in_place = case.strategy == "scatter" and verify == 1  # plain decoding's step writes the state once
        self.words = self.state if in_place else verify * self.per_step
        self.passes = [
            (
                cuda.to_device((self.state + h * self.step).astype(np.int32), stream=stream),
                cuda.to_device((np.zeros_like(h) if in_place else h * self.step).astype(np.int32), stream=stream),
            )
            for h in hs
        ]
        self.blocks = (max(1, min(64, (self.state + 255) // 256)), batch, layers)

    def launch(self, i: int) -> None:
        """Pass ``i``'s verify traffic."""
        reads, starts = self.passes[i]
        traffic[self.blocks, 256, self.stream](self.src, reads, self.dst, starts, self.words, self.sink)


def commit_call(manager, strategy: str, verify: int):
    if strategy == "scatter":
        return None if verify == 1 else manager.scatter_mtp_states
    return manager.replay_mtp_states if strategy == "replay" else manager.checkpoint_mtp_states


def cursor(case: Case, accepts: np.ndarray) -> list[np.ndarray]:
    """Each pass's ``h`` per row before its window (the cursor rule; zeros outside checkpoint mode)."""
    h = np.zeros(case.batch, np.int64)
    out = []
    for a in accepts:
        out.append(h.copy())
        if case.strategy == "checkpoint":
            h = h + a
            h[h + case.config.max_intermediate_seq_len > case.history_len] = 0
    return out


def run_case(case: Case, accepts: np.ndarray, timer, stream) -> dict:
    """Time ``PASSES`` verify passes + commits of one case; ``timer(fn, reset)`` returns device us of ``fn``."""
    manager = NumbaMambaCacheManager(case.config, stream=stream)
    hs = cursor(case, accepts)
    verify = VerifyTraffic(case, hs, stream)
    commit = commit_call(manager, case.strategy, case.verify)
    rows = [cuda.to_device(a, stream=stream) for a in accepts]
    every_slot = cuda.to_device(np.arange(case.batch, dtype=np.int32), stream=stream)

    def reset():  # checkpoint mode: start every timed run from h = 0, as `cursor` does
        if case.strategy == "checkpoint":
            manager.materialize(every_slot, stream=stream)

    def one_run():
        manager.reshape_intermediate_states(case.batch, case.verify)
        for i in range(PASSES):
            verify.launch(i)
            if commit is not None:
                commit(rows[i], stream=stream)

    reset()
    one_run()  # compile, warm up
    us = timer(one_run, reset)
    layers = case.config.num_recurrent_layers
    tokens = int(accepts.sum())
    traffic_run = [state_traffic(case.config, case.strategy, accepts[:, b], verify=case.verify,
                                 history_len=case.history_len or None) for b in range(case.batch)]  # fmt: skip
    model_bytes = sum(t.bytes_read + t.bytes_written for t in traffic_run)
    replayed = sum(int(h.sum()) for h in hs) if case.strategy == "checkpoint" else 0
    return {
        "op": "strategy",
        "preset": case.preset,
        "mixer": case.config.mixer,
        "state_dtype": case.config.recurrent_state_dtype.name,
        "strategy": case.strategy,
        "V": case.verify,
        "batch": case.batch,
        "R": case.history_len,
        "layers_timed": layers,
        "bytes_per_token": round(model_bytes / tokens / layers),
        "us_per_token": round(us / tokens / layers, 5),
        "replayed_steps_per_token": round(replayed / tokens, 2),
        "slot_bytes_per_layer": traffic_run[0].slot_bytes // layers,
        "folds": sum(t.folds for t in traffic_run),
    }


def main(argv=None) -> int:
    import torch

    from benchmarks.records import new_results_path
    from benchmarks.run import copy_gbps, sleep_then

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--layers", type=int, default=4, help="layers timed (ratios are per layer)")
    args = parser.parse_args(argv)
    card = torch.cuda.get_device_name()
    stream = torch.cuda.Stream()
    numba_stream = cuda.external_stream(stream.cuda_stream)
    ceiling = copy_gbps(2 << 30, stream)
    print(f"{card}: copy ceiling {ceiling:.0f} GB/s (eager 2 GiB device-to-device copy)", flush=True)

    def timer(fn, reset):
        """Median device time of ``fn`` over 7 runs, each after ``reset`` and a sleep kernel covering its dispatch."""
        samples, host_s = [], 0.02
        for _ in range(7):
            reset()
            stream.synchronize()
            begin = time.perf_counter()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sleep_then(stream, 2e6 * host_s)  # the first run's dispatch time covers the next
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            host_s = time.perf_counter() - begin
            samples.append(start.elapsed_time(end) * 1e3)
        return statistics.median(samples[1:])

    rng = np.random.default_rng(0)
    records = []
    for case, accepts in cases(args.layers, [int(b) for b in args.batches.split(",")], rng):
        records.append(run_case(case, accepts, timer, numba_stream))
        r = records[-1]
        label = f"{r['preset']:<20} V={r['V']} batch {r['batch']:>3} {r['strategy']:<10} R={r['R']:<3}"
        print(f"  {label} {r['bytes_per_token'] / 2**20:8.2f} MiB/token {r['us_per_token']:9.3f} us/token", flush=True)
    for r in records:
        scatter = next(
            s for s in records
            if (s["preset"], s["V"], s["batch"], s["strategy"]) == (r["preset"], r["V"], r["batch"], "scatter")
        )  # fmt: skip
        r["ratio_to_scatter"] = {
            "bytes": round(r["bytes_per_token"] / scatter["bytes_per_token"], 3),
            "time": round(r["us_per_token"] / scatter["us_per_token"], 3),
        }
    records += fold_records(args.layers, stream, numba_stream, rng, ceiling)
    path = new_results_path(args.out, "strategies", card)
    path.write_text(__import__("json").dumps({"card": card, "copy_ceiling_gbps": round(ceiling, 1),
                                              "records": records}, indent=1))  # fmt: skip
    print(f"wrote {path}")
    return 0


def fold_records(layers: int, stream, numba_stream, rng, ceiling: float) -> list[dict]:
    """The fold alone: R = S = V = 4, batch 32, accept lengths 1..4, so every commit folds every row."""
    from benchmarks.run import device_time_us

    out = []
    for name in PRESET_NAMES:
        config = preset_config(name, layers, 32, 4, "checkpoint", 4)
        manager = NumbaMambaCacheManager(config, stream=numba_stream)
        accept = rng.integers(1, 5, 32).astype(np.int32)
        rows = cuda.to_device(accept, stream=numba_stream)
        manager.reshape_intermediate_states(32, 4)
        manager.checkpoint_mtp_states(rows, stream=numba_stream)
        us = device_time_us([lambda: manager.checkpoint_mtp_states(rows, stream=numba_stream)], stream, 50)
        state = word_counts(config, "checkpoint", 4)[0]
        nbytes = layers * sum(
            2 * state * WORD + int(a) * config.stash_step_bytes for a in accept
        )  # read + write state, a steps
        gbps = nbytes / us / 1e3
        record = {"op": "fold", "preset": name, "batch": 32, "V": 4, "R": 4, "device_us": round(us, 2)}
        record.update(moved_bytes=nbytes, moved_gbps=round(gbps, 1), ratio_to_ceiling=round(gbps / ceiling, 3))
        out.append(record)
        print(f"  fold {name}: {us:.1f} us, {gbps:.0f} GB/s = {gbps / ceiling:.2f} of the copy ceiling", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
