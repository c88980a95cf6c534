"""A small mutation run: do the tests catch realistic one-line bugs in the reference, kernels and checks?

    python .ci/mutate.py [--only ID,ID] [--timeout SECONDS] [--list]      (or: make mutate)

Each mutant below replaces one exact, unique piece of source (an off-by-one in a range check, ``<``
for ``<=``, a dropped ``- 1``, a wrong index, a skipped layer or state kind, a dropped bounds check,
a wrong chunk base, ...). For each, the script writes the mutated file into a temporary copy of the
tree (the working tree is never modified, so Ctrl-C leaves nothing mutated behind; the copy is
deleted on exit), runs its focused tests there (the mutant's own list, else its file's) under the
CUDA simulator with ``-x`` and a timeout, and records "caught" (a test failed, or the run timed
out) or "survived". It prints a table and the score, and exits non-zero if any mutant survived or
no longer applies ("stale": its source text was edited away; update the mutant). About ten minutes
on two CPU cores; docs/development.md holds the latest table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

NUMPY = "mamba_cache/core/numpy_backend.py"
KERNELS = "mamba_cache/core/kernels.py"
CHECKS = "mamba_cache/core/checks.py"
COMMITS = "mamba_cache/core/commits.py"
SLOTS = "mamba_cache/core/slots.py"
LAUNCH = "mamba_cache/core/launch.py"
NUMBA = "mamba_cache/core/numba_args.py"  # the Numba backend's argument checks
ROWS = "mamba_cache/core/rows.py"  # the commit row rule of every kernel (padding included)
MOVING = "mamba_cache/core/moving.py"  # export / import / offload / resume
PARCEL = "mamba_cache/moving/parcel.py"  # the parcel's layout, fingerprint and shards
CKPT_KERNELS = "mamba_cache/checkpoint/kernels.py"
PREFIX_KEYS = "mamba_cache/prefix/keys.py"
PREFIX_STORE = "mamba_cache/prefix/store.py"

# The focused tests of each file, fastest-failing first (``-x`` stops at the first failure).
MUTANTS_CHECKS = [
    "tests/test_mutants.py::test_state_indices_longer_than_accept_lengths_is_refused",
    "tests/test_mutants.py::test_accept_lengths_one_past_the_view_is_refused",
    "tests/test_mutants.py::test_two_committing_rows_naming_one_slot_are_refused",
]
TESTS = {
    NUMPY: [
        *MUTANTS_CHECKS,
        "tests/test_golden.py",
        "tests/test_slots_and_trees.py",
        "tests/test_manager.py",
    ],
    KERNELS: [
        "tests/test_numba.py::test_launch_shape_covers_the_slot",
        "tests/test_golden.py",
        "tests/test_slots_and_trees.py",
        "tests/test_mutants.py::test_parity_on_slots_of_more_than_two_chunks",
        "tests/test_parity.py",
    ],
    ROWS: [
        "tests/test_golden.py",
        "tests/test_slots_and_trees.py",
        "tests/test_parity.py",
        "tests/test_padding.py",
    ],
    CHECKS: [*MUTANTS_CHECKS, "tests/test_slots_and_trees.py", "tests/test_bad_inputs.py"],
    COMMITS: [*MUTANTS_CHECKS, "tests/test_slots_and_trees.py", "tests/test_bad_inputs.py"],
    SLOTS: ["tests/test_bad_inputs.py", "tests/test_slots_and_trees.py"],
    LAUNCH: ["tests/test_numba.py::test_launch_shape_covers_the_slot", "tests/test_golden.py", "tests/test_parity.py"],
    NUMBA: [
        "tests/test_mutants.py::test_non_contiguous_device_state_is_refused_by_restore_slot",
        "tests/test_bad_inputs.py",
    ],
}

PADDING = (
    "tests/test_padding.py::test_scatter_and_tree_padding_rows_commit_and_track_nothing",
    "tests/test_padding.py::test_copy_slots_skips_padding_pairs",
    "tests/test_padding.py::test_replay_padding_rows_commit_and_track_nothing",
    "tests/test_padding.py::test_checkpoint_mode_padding_rows",
)
IMPORT_CHECKS = (
    "tests/test_moving.py::test_import_refuses_and_changes_nothing",
    "tests/test_moving.py::test_fingerprint_names_the_model_fields_only",
    "tests/test_moving.py::test_shards_that_do_not_tile_the_heads_are_refused",
)
CKPT_NUMPY = (
    "tests/test_checkpoint.py::test_state_after_reads_the_state_before_each_window_step",
    "tests/test_checkpoint.py::test_materialize_folds_into_the_checkpoint",
    "tests/test_checkpoint.py::test_counters_round_trip_and_reset",
    "tests/test_checkpoint.py::test_long_run_keeps_the_decoded_state_whenever_it_folds",
)
CKPT_NUMBA = (
    "tests/test_checkpoint.py::test_numba_reads_copies_and_materialize_as_the_reference[mamba2-bfloat16-True]",
    "tests/test_checkpoint.py::test_numba_commit_folds_as_the_reference_and_as_its_replay_commit[mamba2-bfloat16-True-7]",
    "tests/test_checkpoint.py::test_numba_commit_folds_as_the_reference_and_as_its_replay_commit[mamba2-float16-False-3]",
)
TAIL_KEYS = (
    "tests/test_prefix_offgrid.py::test_tail_key_is_the_documented_personalised_blake2b",
    "tests/test_golden.py::test_prefix_tail_keys_match_golden",
    "tests/test_prefix_offgrid.py::test_off_grid_insert_match_restore",
)


class Mutant(NamedTuple):
    """One mutation: replace ``old`` (exactly once in ``path``) by ``new``; ``tests`` must catch it.

    ``tests``: the focused tests of this mutant, fastest-failing first; empty: its file's list in ``TESTS``.
    """

    id: str
    path: str
    old: str  # must occur exactly once in the file
    new: str
    what: str
    tests: tuple = ()

    @property
    def focused(self) -> list:
        """The tests this mutant runs."""
        return list(self.tests or TESTS[self.path])


MUTANTS = [
    # ---- the NumPy reference
    Mutant(
        "np-drop-minus-1",
        NUMPY,
        "step = accept.astype(np.int64) - 1",
        "step = accept.astype(np.int64)",
        "scatter: dropped `- 1` (commits step accept instead of accept - 1)",
    ),
    Mutant(
        "np-step-le",
        NUMPY,
        "(step >= 0) & (step < max_accept)",
        "(step >= 0) & (step <= max_accept)",
        "scatter: `<` -> `<=` on max_accept (commits a full accept)",
    ),
    Mutant(
        "np-step-gt0",
        NUMPY,
        "(step >= 0) & (step < max_accept)",
        "(step > 0) & (step < max_accept)",
        "scatter: `>= 0` -> `> 0` (skips accept == 1)",
    ),
    Mutant(
        "np-tree-width-le",
        NUMPY,
        "considered = (np.arange(width) < np.clip(",
        "considered = (np.arange(width) <= np.clip(",
        "tree: considers one id past accept_lengths",
    ),
    Mutant(
        "np-tree-node-le",
        NUMPY,
        "& (node < seq_len), indices",
        "& (node <= seq_len), indices",
        "tree: node == V accepted",
    ),
    Mutant(
        "np-slot-negative",
        NUMPY,
        "ok = ok & (slots >= 0) & (slots <",
        "ok = ok & (slots <",
        "commit: dropped the `slot >= 0` bounds check",
    ),
    Mutant(
        "np-row-stride",
        NUMPY,
        "src_rows = rows * seq_len + step[rows]",
        "src_rows = rows + step[rows]",
        "commit: wrong intermediate row (b + step instead of b * V + step)",
    ),
    Mutant(
        "np-skip-conv",
        NUMPY,
        "((pools.recurrent, pools.intermediate_recurrent), (pools.conv, pools.intermediate_conv))",
        "((pools.recurrent, pools.intermediate_recurrent),)",
        "commit: skipped the conv state kind",
    ),
    Mutant(
        "np-clear-skip-layer",
        NUMPY,
        "            pool[:, slot] = 0",
        "            pool[1:, slot] = 0",
        "clear_slot: skipped layer 0 of every pool",
    ),
    Mutant(
        "np-capture-alias",
        NUMPY,
        "return self._export(pool[:, slot : slot + 1].copy(), pool.dtype)",
        "return self._export(pool[:, slot : slot + 1], pool.dtype)",
        "capture: returns a view of the pool, not a copy",
    ),
    Mutant(
        "np-duplicates",
        NUMPY,
        "if (counts > 1).any():  # the GPU gives no defined winner: the checked reference refuses\n"
        '            raise ValueError(\n                f"committing rows',
        "if (counts > 2).any():  # the GPU gives no defined winner: the checked reference refuses\n"
        '            raise ValueError(\n                f"committing rows',
        "commit: lets two rows name one slot",
    ),
    # ---- the kernels
    Mutant(
        "k-accept-ge",
        ROWS,
        "if accepted < 1 or accepted > max_accept:",
        "if accepted < 1 or accepted >= max_accept:",
        "scatter kernel: `>` -> `>=` on max_accept",
    ),
    Mutant(
        "k-drop-minus-1",
        KERNELS,
        "row, row * seq_len + (accepted - 1))",
        "row, row * seq_len + accepted)",
        "scatter kernel: dropped `- 1`",
    ),
    Mutant(
        "k-tree-clamp",
        ROWS,
        "    if count > node_ids.shape[1]:\n        count = node_ids.shape[1]\n    node = -1",
        "    if count > node_ids.shape[1] + 1:\n        count = node_ids.shape[1]\n    node = -1",
        "tree kernel: off-by-one clamp of accept_lengths to M (reads past the row)",
    ),
    Mutant(
        "k-tree-candidate",
        ROWS,
        "if candidate >= 0:",
        "if candidate > 0:",
        "tree kernel: node 0 treated as a rejected id",
    ),
    Mutant(
        "k-tree-node-gt",
        ROWS,
        "    if node < 0 or node >= seq_len:\n        return -1, -1",
        "    if node < 0 or node > seq_len:\n        return -1, -1",
        "tree kernel: node == V accepted",
    ),
    Mutant(
        "k-slot-bound",
        ROWS,
        "if slot < 0 or slot >= slots:",
        "if slot < 0 or slot > slots:",
        "commit row rule: slot == B taken as a slot (`>=` -> `>`; a negative slot is the rule's own 'none')",
    ),
    Mutant(
        "k-slot-negative",
        KERNELS,
        "    if slot < 0:\n        return\n    layer = cuda.blockIdx.z",
        "    layer = cuda.blockIdx.z",
        "commit kernel: dropped the `slot < 0` check (row_slot's -1 for padding or out of range is written)",
    ),
    Mutant(
        "k-chunk-base",
        KERNELS,
        "_copy_chunk(dst_b, layer, slot, src_b, layer, src_row, chunk - chunks_a)",
        "_copy_chunk(dst_b, layer, slot, src_b, layer, src_row, chunk)",
        "commit kernel: wrong chunk base of the second state kind",
    ),
    Mutant(
        "k-chunk-stride",
        KERNELS,
        "base = chunk * threads * WORDS_PER_THREAD + cuda.threadIdx.x\n    words = dst.shape[2]\n    buf",
        "base = chunk * threads * (WORDS_PER_THREAD + 1) + cuda.threadIdx.x\n    words = dst.shape[2]\n    buf",
        "copy: wrong chunk stride, gaps between chunks (only seen with slots of more than one chunk)",
    ),
    Mutant(
        "k-copy-layer",
        KERNELS,
        "_copy_chunk(dst, layer, 0, src, layer, slot, cuda.blockIdx.x)",
        "_copy_chunk(dst, layer, 0, src, 0, slot, cuda.blockIdx.x)",
        "capture kernel: wrong index (always reads layer 0)",
    ),
    Mutant(
        "k-zero-slot-kind",
        KERNELS,
        "    else:\n        _zero_row(dst_b, layer, slot, chunk - chunks_a)",
        "    else:\n        _zero_row(dst_a, layer, slot, chunk - chunks_a)",
        "clear_slot kernel: swapped state kinds (zeroes kind a twice)",
    ),
    Mutant(
        "k-zero-words-le",
        KERNELS,
        "if block < blocks_a:",
        "if block <= blocks_a:",
        "zero_words: `<` -> `<=` on the first pool's blocks",
    ),
    Mutant(
        "k-chunks-floor",
        LAUNCH,
        "return tuple(-(-u // (threads * p)) for u, p in zip(units, per_thread, strict=True)), threads",
        "return tuple(u // (threads * p) for u, p in zip(units, per_thread, strict=True)), threads",
        "launch_shape: floor instead of ceil (the last partial chunk not launched)",
    ),
    # ---- the checks
    Mutant(
        "m-index-le", CHECKS, "if not 0 <= index < stop:", "if not 0 <= index <= stop:", "check_index: accepts stop"
    ),
    Mutant(
        "m-size-lt",
        CHECKS,
        "if not low <= size <= high:",
        "if not low <= size < high:",
        "check_size: refuses the maximum",
    ),
    Mutant(
        "m-view-plus-1",
        COMMITS,
        "if active > view:",
        "if active > view + 1:",
        "accept_lengths one row longer than the view accepted",
    ),
    Mutant(
        "m-indices-longer",
        COMMITS,
        'if count != active:\n                raise ValueError(f"state_indices',
        'if count < active:\n                raise ValueError(f"state_indices',
        "state_indices longer than accept_lengths accepted",
    ),
    Mutant(
        "m-tree-rows",
        COMMITS,
        "if shape[0] != active:\n"
        '            raise ValueError(f"accepted_node_ids must have len(accept_lengths) = {active} rows, '
        'got {shape[0]}")\n'
        '        checked_positions = self._positions("scatter_accepted_tree_states"',
        "if shape[0] < active:\n"
        '            raise ValueError(f"accepted_node_ids must have len(accept_lengths) = {active} rows, '
        'got {shape[0]}")\n'
        '        checked_positions = self._positions("scatter_accepted_tree_states"',
        "tree: more node rows than accept_lengths accepted",
    ),
    Mutant(
        "m-restore-layers",
        SLOTS,
        "if len(states) > config.num_recurrent_layers:",
        "if len(states) > config.num_recurrent_layers + 1:",
        "restore_slot: one list entry too many accepted",
    ),
    Mutant(
        "m-max-accept",
        COMMITS,
        "return seq_len - 1 if self._config.verify_writes_main_pool else seq_len",
        "return seq_len - 1",
        "scatter: ignores verify_writes_main_pool",
    ),
    Mutant(
        "m-contiguous",
        CHECKS,
        '    if not contiguous:\n        raise ValueError(f"{name} must be contiguous")',
        '    if False:\n        raise ValueError(f"{name} must be contiguous")',
        "check_int32_array: dropped the contiguity check",
    ),
    Mutant(
        "nb-restore-contiguous",
        NUMBA,
        "if not array.is_c_contiguous():",
        "if False:",
        "Numba restore_slot: dropped the contiguity check of a state",
    ),
    # ---- the 2026 checks: padding rows, moving states, checkpoint commits, off-grid prefix keys
    Mutant(
        "np-pad-track",
        NUMPY,
        "if indices is not None:  # a padding row tracks nothing",
        "if False:  # a padding row tracks nothing",
        "scatter tracking: dropped the padding clause (a -1 row still writes its tracked entry)",
        PADDING,
    ),
    Mutant(
        "k-pad-ckpt-counters",
        CKPT_KERNELS,
        "if (accepted == 0 and not force) or slot < 0:",
        "if accepted == 0 and not force:",
        "plan_commit kernel: dropped the `slot < 0` check (a padding row moves the counters of slot -1)",
        PADDING,
    ),
    Mutant(
        "k-pad-is-padding",
        ROWS,
        "        return state_indices[row] == pad_slot_id",
        "        return state_indices[row] < pad_slot_id",
        "is_padding: `==` -> `<`, a -1 row counts as live (its tracked entry is written)",
        PADDING,
    ),
    Mutant(
        "mv-checksum-last",
        MOVING,
        "bad = np.flatnonzero(np.asarray(sums, dtype=np.int64) != np.asarray(descriptor.checksums, dtype=np.int64))",
        "bad = np.flatnonzero(np.asarray(sums[:-1], dtype=np.int64) != np.asarray(descriptor.checksums[:-1], "
        "dtype=np.int64))",
        "import: the last chunk's checksum not compared",
        IMPORT_CHECKS,
    ),
    Mutant(
        "mv-fingerprint-mixer",
        PARCEL,
        '        "mixer": config.mixer,\n',
        "",
        "fingerprint: the mixer left out (a Mamba2 parcel imports into a GDN cache of the same shapes)",
        IMPORT_CHECKS,
    ),
    Mutant(
        "mv-shard-tiles",
        PARCEL,
        "    if total % size:\n        return None\n",
        "",
        "shards: a TP size that does not divide the heads accepted (its shards do not tile them)",
        IMPORT_CHECKS,
    ),
    Mutant(
        "mv-write-before-check",
        MOVING,
        "        sums = self._chunk_checksums(staged, descriptor.chunk_bytes, resolved)\n",
        "        self._copy_runs(\n"
        "            runs(config, list(descriptor.parts), rows, config.max_batch_size),\n"
        "            staged, (self._pools.recurrent, self._pools.conv), False, resolved,\n"
        "        )\n"
        "        sums = self._chunk_checksums(staged, descriptor.chunk_bytes, resolved)\n",
        "import: the slots written before the checksums are compared",
        IMPORT_CHECKS,
    ),
    Mutant(
        "mv-resume-generation",
        MOVING,
        "        pool.generations[entry] += 1\n",
        "",
        "resume: the entry's generation not bumped (a used handle resumes the entry's next state)",
        (
            "tests/test_moving.py::test_a_used_handle_never_resumes_the_entry_s_next_state",
            "tests/test_moving.py::test_offload_and_resume_are_bit_exact_and_single_use",
        ),
    ),
    Mutant(
        "np-ckpt-fold-ge",
        NUMPY,
        "folds = after + config.max_intermediate_seq_len > config.history_len",
        "folds = after + config.max_intermediate_seq_len >= config.history_len",
        "checkpoint commit: folds when the next window would just fit (`>` -> `>=`)",
        CKPT_NUMPY,
    ),
    Mutant(
        "np-ckpt-p0",
        NUMPY,
        "positions[slots] += steps",
        "positions[slots] = steps",
        "checkpoint fold: p0 set to the folded steps instead of advanced by them",
        CKPT_NUMPY,
    ),
    Mutant(
        "k-ckpt-fold-ge",
        CKPT_KERNELS,
        "if force or after + window > ring:",
        "if force or after + window >= ring:",
        "plan_commit kernel: folds when the next window would just fit (`>` -> `>=`)",
        CKPT_NUMBA,
    ),
    Mutant(
        "k-ckpt-p0",
        CKPT_KERNELS,
        "p0[slot] = p0[slot] + after",
        "p0[slot] = p0[slot] + accepted",
        "plan_commit kernel: p0 advanced by this window's steps only, not the whole ring's",
        CKPT_NUMBA,
    ),
    Mutant(
        "og-tail-person",
        PREFIX_KEYS,
        "hasher = hashlib.blake2b(block_digest, digest_size=DIGEST_SIZE, person=TAIL_PERSON)",
        "hasher = hashlib.blake2b(block_digest, digest_size=DIGEST_SIZE)",
        "off-grid key: the personalisation left out (a tail key can equal a block key)",
        TAIL_KEYS,
    ),
    Mutant(
        "og-tail-slice",
        PREFIX_STORE,
        "piece = data[whole * self.block_size :]",
        "piece = data[whole * self.block_size - 1 :]",
        "off-grid key: the store's tail slice starts one token early",
        TAIL_KEYS,
    ),
]


def tree_copy(dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files of the working tree into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_one(copy: Path, mutant: Mutant, timeout: float) -> tuple[str, str, float]:
    """(result, detail, seconds) of one mutant, run in the temporary ``copy``."""
    path = copy / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return "stale", f"source text found {original.count(mutant.old)} times", 0.0
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.focused]
    start = time.monotonic()
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        try:
            result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught", f"timed out after {timeout:.0f} s", time.monotonic() - start
    finally:
        path.write_text(original)
    seconds = time.monotonic() - start
    if result.returncode == 0:
        return "survived", "", seconds
    failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", result.stdout, re.MULTILINE)
    if failed:
        return "caught", failed.group(1), seconds
    if result.returncode == 5:  # no tests collected
        return "error", "no tests ran", seconds
    return "caught", (result.stdout.strip().splitlines() or [f"exit status {result.returncode}"])[-1], seconds


def baseline(copy: Path, timeout: float, mutants: list) -> None:
    """The unmutated tree must pass the focused tests of ``mutants`` (else every mutant would look caught)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    files = sorted({t for m in mutants for t in m.focused})
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files]
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout * 4)
    if result.returncode != 0:
        sys.exit("the unmutated tree fails its focused tests:\n" + result.stdout[-3000:])


def main(argv: list[str] | None = None) -> int:
    """Run the mutants (all, or ``--only``); print the table and the score; 0 when all are caught."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutant ids")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per mutant (default 150)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        wanted = set(args.only.split(","))
        mutants = [m for m in MUTANTS if m.id in wanted]
        if len(mutants) != len(wanted):
            parser.error(f"unknown mutant ids: {sorted(wanted - {m.id for m in MUTANTS})}")
    if args.list:
        for m in mutants:
            print(f"{m.id:24} {m.path:38} {m.what}")
        return 0
    copy = Path(tempfile.mkdtemp(prefix="mamba-cache-mutate-"))
    rows = []
    start = time.monotonic()
    try:
        tree_copy(copy)
        if not args.no_baseline:
            baseline(copy, args.timeout, mutants)
        for m in mutants:
            result, detail, seconds = run_one(copy, m, args.timeout)
            rows.append((m, result, detail, seconds))
            print(f"{m.id:24} {result:9} {seconds:6.1f} s  {detail}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: the working tree was never modified; removing the temporary copy", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    caught = sum(r == "caught" for _, r, _, _ in rows)
    print()
    print("| mutant | file | mutation | result | caught by |")
    print("|---|---|---|---|---|")
    for m, result, detail, _ in rows:
        print(f"| `{m.id}` | `{Path(m.path).name}` | {m.what} | {result} | {detail.replace('|', '/')} |")
    print()
    print(f"score: {caught}/{len(rows)} caught ({time.monotonic() - start:.0f} s)")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
