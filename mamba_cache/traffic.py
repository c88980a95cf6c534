"""State traffic of the three commit modes: bytes a verify pass and its commit read and write per token.

A recurrent state is large (Nemotron-H-8B: 2 MiB a layer and slot in float16) and a step's inputs are
small (the replay stash's fields: about 41 KiB). What a decoding strategy costs in memory traffic is
how many whole states it reads and writes per accepted token. This module counts it, from the
config's sizes and a sequence of accept lengths, for one slot and all layers:

``scatter``
    The verify pass reads the state and writes each of its ``V`` per-step states; the commit reads
    the accepted one and writes it into the slot. Plain decoding (``V = 1``) steps in place: one
    read and one write of the state.
``replay``
    The verify pass reads the state and writes ``V`` stash steps; the commit reads the state and the
    ``a`` accepted steps and writes the state.
``checkpoint``
    The verify pass reads the checkpoint and the ``h`` ring steps past it (the window's own steps
    stay in registers) and writes ``V`` ring steps; the commit moves no state byte unless the ring
    could not hold another window (``h + a + S > R``), when it folds: reads the checkpoint and
    ``h + a`` steps, writes the checkpoint.

The counts are a model of the state path alone (the verify pass's state reads and per-step writes,
the commit or fold), not of a kernel: `benchmarks/strategies.py` times the same path on a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ._config import Config

#: The commit modes this model counts, in the order the docs compare them.
STRATEGIES = ("scatter", "replay", "checkpoint")


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes one slot moves, all layers, over a run of verify passes and commits.

    Attributes:
        strategy: ``"scatter"``, ``"replay"`` or ``"checkpoint"``.
        verify: V, the verify window (1 = plain decoding).
        history_len: R (checkpoint mode), else 0.
        tokens: accepted tokens over the run.
        bytes_read: state, per-step and history bytes read.
        bytes_written: state, per-step and history bytes written.
        folds: commits that wrote the state (every accepting commit outside checkpoint mode).
        slot_bytes: memory one slot holds in this mode (main pools, per-step buffers or stash or
            history; the checkpoint mode's counters included).
    """

    strategy: str
    verify: int
    history_len: int
    tokens: int
    bytes_read: int
    bytes_written: int
    folds: int
    slot_bytes: int

    @property
    def bytes_per_token(self) -> float:
        """Bytes read and written per accepted token."""
        return (self.bytes_read + self.bytes_written) / max(self.tokens, 1)


def state_traffic(
    config: Config,
    strategy: str,
    accept_lengths: Iterable[int],
    *,
    verify: int | None = None,
    history_len: int | None = None,
) -> Traffic:
    """Count the state traffic of one slot over a sequence of verify passes (one per accept length).

    Args:
        config: the model's sizes and dtypes (its commit mode is ignored: ``strategy`` says it).
        strategy: ``"scatter"``, ``"replay"`` or ``"checkpoint"``.
        accept_lengths: the accepted tokens of each verify pass, each in ``1..V``.
        verify: V, the window (``1..S``); default ``config.max_intermediate_seq_len``.
        history_len: R for checkpoint mode (``>= S``); default ``config.history_len`` or S.

    Returns:
        The [`Traffic`][mamba_cache.traffic.Traffic] of the run.

    Raises:
        ValueError: an unknown strategy, a window or history out of range, or an accept length
            outside ``1..V``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    seq = config.max_intermediate_seq_len
    verify = seq if verify is None else verify
    if not 1 <= verify <= max(seq, 1):
        raise ValueError(f"verify must be in 1..{max(seq, 1)} (max_intermediate_seq_len), got {verify}")
    ring = 0
    if strategy == "checkpoint":
        ring = history_len if history_len is not None else max(config.history_len, seq)
        if ring < seq:
            raise ValueError(f"history_len must be >= max_intermediate_seq_len ({seq}), got {ring}")
    mode = config.in_commit_mode(strategy)
    if strategy == "checkpoint":
        mode = dataclasses.replace(mode, history_len=ring)
    if strategy == "scatter":
        mode = dataclasses.replace(mode, verify_writes_main_pool=False)
    pools = mode.pool_bytes()
    slots = config.max_batch_size
    state = (pools["recurrent"] + pools["conv"]) // slots
    per_step = (pools["intermediate_recurrent"] + pools["intermediate_conv"]) // max(slots * seq, 1)
    step = config.num_recurrent_layers * config.stash_step_bytes  # one step of the stash or ring, all layers
    read = written = tokens = folds = h = 0
    for a in accept_lengths:
        a = int(a)
        if not 1 <= a <= verify:
            raise ValueError(f"accept lengths must be in 1..{verify} (the verify window), got {a}")
        tokens += a
        if strategy == "scatter" and verify == 1:  # plain decoding steps the state in place
            read, written, folds = read + state, written + state, folds + 1
        elif strategy == "scatter":
            read, written = read + state + per_step, written + verify * per_step + state
            folds += 1
        elif strategy == "replay":
            read, written = read + 2 * state + a * step, written + verify * step + state
            folds += 1
        else:
            read, written = read + state + h * step, written + verify * step
            h += a
            if h + seq > ring:
                read, written, folds, h = read + state + h * step, written + state, folds + 1, 0
    held = sum(pools.values()) // slots
    if strategy == "scatter" and verify == 1:  # plain decoding keeps no per-step states
        held = state
    return Traffic(strategy, verify, ring, tokens, read, written, folds, held)


def best_history_len(
    config: Config, accept_lengths: Iterable[int], *, verify: int | None = None, candidates: Iterable[int] = ()
) -> Traffic:
    """The checkpoint-mode ``R`` with the fewest bytes per token over the run (ties: the smaller R).

    Args:
        config: as for [`state_traffic`][mamba_cache.traffic.state_traffic].
        accept_lengths: the run's accept lengths.
        verify: V, default S.
        candidates: the R values to try; default every R from S to 64 S.

    Returns:
        The best run's [`Traffic`][mamba_cache.traffic.Traffic] (its ``history_len`` is the R).
    """
    accepts = list(accept_lengths)
    seq = config.max_intermediate_seq_len
    ring_sizes = list(candidates) or list(range(seq, 64 * seq + 1))
    runs = [state_traffic(config, "checkpoint", accepts, verify=verify, history_len=r) for r in ring_sizes]
    return min(runs, key=lambda t: (t.bytes_per_token, t.history_len))
