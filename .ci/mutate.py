"""A small mutation run: do the tests catch realistic one-line bugs in the reference, kernels and checks?

    python .ci/mutate.py [--only ID,ID] [--timeout SECONDS] [--list]      (or: make mutate)

Each mutant below replaces one exact, unique piece of source (an off-by-one in a range check, ``<``
for ``<=``, a dropped ``- 1``, a wrong index, a skipped layer or state kind, a dropped bounds check,
a wrong chunk base, ...). For each, the script writes the mutated file into a temporary copy of the
tree (the working tree is never modified, so Ctrl-C leaves nothing mutated behind; the copy is
deleted on exit), runs that file's focused test list there under the CUDA simulator with ``-x`` and
a timeout, and records "caught" (a test failed, or the run timed out) or "survived". It prints a
table and the score, and exits non-zero if any mutant survived or no longer applies ("stale": its
source text was edited away; update the mutant). About ten minutes on two CPU cores; docs/development.md
holds the latest table.
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
ROWS = "mamba_cache/core/rows.py"  # the commit row rule every commit kernel calls
CHECKS = "mamba_cache/core/checks.py"
COMMITS = "mamba_cache/core/commits.py"
SLOTS = "mamba_cache/core/slots.py"
LAUNCH = "mamba_cache/core/launch.py"
NUMBA = "mamba_cache/core/numba_args.py"  # the Numba backend's argument checks

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


class Mutant(NamedTuple):
    """One mutation: replace ``old`` (exactly once in ``path``) by ``new``."""

    id: str
    path: str
    old: str  # must occur exactly once in the file
    new: str
    what: str


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
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS[mutant.path]]
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


def baseline(copy: Path, timeout: float) -> None:
    """The unmutated tree must pass every focused list (else every mutant would look caught)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    files = sorted({t for tests in TESTS.values() for t in tests})
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
            baseline(copy, args.timeout)
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
