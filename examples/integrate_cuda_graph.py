"""CUDA graphs: one speculative step (verify pass + commit) captured with ``torch.cuda.graph`` and replayed.

GPU only (``tests/test_integrate.py`` runs :func:`run` on a GPU machine and skips it elsewhere). The
verify pass is the torch loop of ``examples/integrate_engine.py``; the commit is the cache's one
prepared launch, queued on the capturing stream. The drafts and accept lengths live in static
device tensors that are rewritten before each replay. Each replay is checked against the same step
run eagerly on a second cache: the states must be bit-identical (same kernels, same inputs).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the engine loop beside this file

from integrate_engine import VOCAB, commit, decode_step, make_cache, make_config, make_weights, pools_on_host, verify  # noqa: E402, I001


def run(commit_mode: str = "scatter", rounds: int = 4, seed: int = 0) -> list:
    """Capture one step, replay it ``rounds`` times with new drafts / accept lengths; returns per-round equality."""
    rng = np.random.default_rng(seed)
    weights = make_weights("cuda")
    config = make_config(commit_mode)
    verify_len = config.max_intermediate_seq_len
    eager, graphed = make_cache(config, "cuda"), make_cache(config, "cuda")
    slots = torch.tensor([2, 0, 3], dtype=torch.int32, device="cuda")
    prompt = torch.as_tensor(rng.integers(0, VOCAB, (3, 5)), device="cuda")
    for t in range(prompt.shape[1]):
        decode_step(eager, weights, prompt[:, t], slots)
        decode_step(graphed, weights, prompt[:, t], slots)
    # --8<-- [start:capture]
    drafts = torch.zeros((3, verify_len), dtype=torch.int64, device="cuda")  # static inputs: rewritten, never
    accept = torch.ones(3, dtype=torch.int32, device="cuda")  # reallocated, before each replay
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside capture: prepares the commit's launch, loads kernels
        verify(graphed, weights, drafts, slots)
        commit(graphed, accept, slots, stream)
    torch.cuda.current_stream().wait_stream(stream)
    # (the warm-up committed 1 accepted token of all-zero drafts: the eager cache does the same below)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # capture: no allocation by the cache, no host sync
        verify(graphed, weights, drafts, slots)
        commit(graphed, accept, slots, stream)
    # --8<-- [end:capture]
    verify(eager, weights, drafts, slots)
    commit(eager, accept, slots, torch.cuda.current_stream())
    same = []
    for _ in range(rounds):
        new_drafts = torch.as_tensor(rng.integers(0, VOCAB, (3, verify_len)), device="cuda")
        new_accept = torch.as_tensor(rng.integers(1, verify_len + 1, 3), dtype=torch.int32, device="cuda")
        # --8<-- [start:replay]
        drafts.copy_(new_drafts)  # this step's inputs into the captured addresses
        accept.copy_(new_accept)  # accept lengths decided on the device: no host round trip
        graph.replay()
        # --8<-- [end:replay]
        verify(eager, weights, new_drafts, slots)
        commit(eager, new_accept, slots, torch.cuda.current_stream())
        torch.cuda.synchronize()
        same.append(
            all(a.tobytes() == b.tobytes() for a, b in zip(pools_on_host(graphed), pools_on_host(eager), strict=True))
        )
    return same


if __name__ == "__main__":
    for mode in ("scatter", "replay"):
        print(mode, run(mode))
