"""The ``mamba-cache`` command line: memory planning for real models, and the demo."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import textwrap

import numpy as np

from ._config import ConfigError, format_bytes
from .presets import FEEDBACK_ROW, PRESETS, SIZE_FORMS, capacity_config, capacity_table, parse_bytes

#: The most memory one accelerator has today (288 GB of HBM3e: NVIDIA B300, AMD MI355X). A plan or
#: budget above it is per rank, so it cannot be one device's: the CLI says so.
LARGEST_DEVICE_BYTES = 288 * 10**9


def _warn_if_beyond_any_device(what: str, nbytes: int) -> None:
    if nbytes > LARGEST_DEVICE_BYTES:
        print(
            f"mamba-cache plan: warning: {what} of {format_bytes(nbytes)} per rank exceeds the memory of any single "
            f"device (the largest hold {LARGEST_DEVICE_BYTES // 10**9} GB); check --batch, --mtp, --tp and --budget",
            file=sys.stderr,
        )


#: Lines of ``plan`` and ``presets`` are wrapped to this width.
WIDTH = 100

#: What each commit mode keeps for the steps of an MTP verify pass, by ``Config.commit_mode``.
#: ``plan --commit-mode`` offers these, and its comparison has one row each: a new mode (once
#: ``Config`` accounts its bytes) is one entry here.
PER_STEP_BUFFERS = {
    "scatter": "per-step states",
    "replay": "stash",
    "checkpoint": "history ring (R = S)",
}


def _size(text: str) -> int:
    """The argparse ``type`` of every size option: `mamba_cache.presets.parse_bytes`'s grammar."""
    try:
        return parse_bytes(text, name="value")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _wrap(text: str, indent: str = "", first: str | None = None) -> str:
    """``text`` wrapped to ``WIDTH``, its first line starting with ``first`` (``indent`` if None)."""
    return textwrap.fill(
        text,
        WIDTH,
        initial_indent=indent if first is None else first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _dtype_lines(preset, config, given: bool) -> list[str]:
    """The dtypes the table is in, then (labelled) the model's shipped dtypes where they differ.

    Args:
        preset: the model preset.
        config: the config the table is printed from.
        given: whether a dtype option set any of the config's dtypes.
    """
    used = (np.dtype(config.recurrent_state_dtype).name, np.dtype(config.conv_state_dtype).name)
    how = "as given" if given else "the preset's planning default"
    lines = [
        _wrap(
            f"state dtypes of this plan: recurrent {used[0]}, conv {used[1]} ({how}; the per-step pools follow "
            f"them; --dtype, --recurrent-dtype, --conv-dtype set them)",
            "  ",
        )
    ]
    recurrent, conv = preset.shipped_dtypes
    if (recurrent, conv) == used:
        lines.append("  (the model's shipped state dtypes)")
    else:
        lines.append(_wrap(f"shipped state dtypes, not this plan's: recurrent {recurrent}, conv {conv}", "  "))
    lines.append(_wrap(preset.dtype_source, "    ", first="  source: "))
    return lines


def _commit_mode_table(config, budget: int | None) -> str:
    """Each commit mode's main pools, per-step buffers, total, bytes per sequence and batch in ``budget``.

    The bytes are ``Config.pool_bytes()`` of the config in that mode: the main pools are the
    ``recurrent`` and ``conv`` pools (with an 8-bit pool's scales and residuals), every other pool is
    a per-step buffer of the mode (checkpoint
    mode: the history ring of ``Config.in_commit_mode``, ``R = max(history_len, S)``, with its counters).
    """
    header = ["commit mode", "main pools", "per-step buffers", "total", "per sequence"]
    if budget is not None:
        header.append(f"batch in {format_bytes(budget)}")
    rows = [header]
    per_step = {}
    for mode in PER_STEP_BUFFERS:
        mode_config = config.in_commit_mode(mode)
        pools = mode_config.pool_bytes()
        main = (
            pools["recurrent"]
            + pools["conv"]
            + sum(  # with an 8-bit main pool's scales and residuals
                math.prod(shape) * dtype.itemsize
                for name, (shape, dtype) in mode_config.scale_pools().items()
                if "intermediate" not in name
            )
        )
        per_step[mode] = mode_config.total_bytes - main
        mark = "*" if mode == config.commit_mode else " "
        row = [f"{mark} {mode}", format_bytes(main), format_bytes(per_step[mode])]
        row += [format_bytes(mode_config.total_bytes), format_bytes(mode_config.slot_bytes)]
        if budget is not None:
            row.append(str(mode_config.max_batch_size_for(budget)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    kinds = ", ".join(f"{mode} {buffers}" for mode, buffers in PER_STEP_BUFFERS.items())
    lines.append(f"(*) the pools above: --commit-mode {config.commit_mode}")
    lines.append(_wrap(f"per-step buffers: {kinds}"))
    scatter = per_step["scatter"]
    for mode in PER_STEP_BUFFERS:
        if mode != "scatter" and scatter:
            ratio = per_step[mode] / scatter
            lines.append(f"{mode} {PER_STEP_BUFFERS[mode]} / scatter {PER_STEP_BUFFERS['scatter']}: {ratio:.4f}")
    return "\n".join(lines)


def _capacity_lines(preset, args, budget: int) -> list[str]:
    """The largest batch within ``budget`` per state dtype and commit mode, with its ratio to bfloat16's."""
    table = capacity_table(preset, budget, args.mtp, args.tp)
    modes = list(next(iter(table.values())))
    header = ["state dtype", *modes]
    rows, refused = [header], []
    for row, cells in table.items():
        line = [row]
        for mode, batch in cells.items():
            if isinstance(batch, Exception):
                refused.append(f"{row}, {mode}: {batch}")
                line.append(f"refused [{len(refused)}]")
                continue
            reference = table["bfloat16"][mode]
            ratio = (
                f" ({batch / reference:.2f}x)" if isinstance(reference, int) and reference and row != "bfloat16" else ""
            )
            line.append(f"{batch}{ratio}")
        rows.append(line)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        _wrap(
            f"largest batch within {format_bytes(budget)} per rank by state dtype (both kinds, per-step buffers "
            "alike, 8-bit scales included; in brackets: times bfloat16's) and commit mode:"
        ),
        *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows),
    ]
    lines.insert(2, "  ".join("-" * w for w in widths))
    feedback = capacity_config(preset, "int8", "scatter", 0, args.tp)
    residual = dataclasses.replace(feedback, error_feedback=True).pool_bytes()["error_feedback"]
    lines.append(
        _wrap(
            f"{FEEDBACK_ROW}: its bfloat16 residuals, {format_bytes(residual)} per sequence, are counted in that "
            "row only (with MTP in scatter mode its per-step recurrent states are bfloat16)"
        )
    )
    lines += [_wrap(f"[{i}] {reason}", "    ") for i, reason in enumerate(refused, 1)]
    cells = [b for cells in table.values() for b in cells.values() if isinstance(b, int)]
    if cells and max(cells) == 0:
        smallest = min(
            capacity_config(preset, row, "scatter" if mode == "decode" else mode, args.mtp, args.tp).slot_bytes
            for row, cells_ in table.items()
            for mode, b in cells_.items()
            if isinstance(b, int)
        )
        lines.append(
            _wrap(
                f"nothing fits: the smallest sequence (every pool of one slot) needs {format_bytes(smallest)} "
                f"per rank, more than the budget of {format_bytes(budget)}"
            )
        )
    return lines


def _stash_line(config) -> str:
    """The replay stash of one row and one step (checkpoint mode: the ring of one slot and step), field by field."""
    fields = ", ".join(
        f"{name} [{', '.join(map(str, shape))}] {np.dtype(dtype).name}"
        for name, (shape, dtype) in config.replay_stash_fields.items()
    )
    what = (
        f"history ring (R = {config.history_len}) per slot and step"
        if config.has_history
        else "replay stash per row and step"
    )
    return _wrap(f"{what} ({config.mixer}): {fields}", "  ")


def _plan(args) -> int:
    preset = PRESETS[args.preset]
    try:  # every input is checked before anything is printed
        config = preset.config(args.batch, args.mtp, args.tp, commit_mode=args.commit_mode)
        dtypes = {
            "recurrent_state_dtype": args.recurrent_dtype or args.dtype,
            "conv_state_dtype": args.conv_dtype or args.dtype,
        }
        dtypes = {field: value for field, value in dtypes.items() if value}
        # the per-step pools follow the main dtype (None)
        dtypes.update({f"intermediate_{field}": None for field in list(dtypes)})
        if dtypes:
            config = dataclasses.replace(config, **dtypes)
        budget = args.budget
        fits = None if budget is None else config.max_batch_size_for(budget)
    except (ConfigError, ValueError) as error:
        print(f"mamba-cache plan: {error}", file=sys.stderr)
        return 2
    _warn_if_beyond_any_device("the cache", config.total_bytes)
    print(_wrap(preset.description))
    print("\n".join(_dtype_lines(preset, config, given=bool(dtypes))))
    print(
        f"batch {args.batch}, MTP verify length {args.mtp}, tensor parallel {args.tp}, "
        f"commit mode {config.commit_mode}\n"
        f"per rank: {config.recurrent_state_num_heads} heads, {config.conv_dim} conv channels, "
        f"{config.n_groups} group{'s' * (config.n_groups != 1)}, mixer {config.mixer}"
    )
    if config.has_replay_stash or config.has_history:
        print(_stash_line(config))
    print()
    print(config.memory_table(compare_commit_modes=False))
    if config.max_intermediate_seq_len > 0:
        print()
        print(_commit_mode_table(config, budget))
    print(f"\nper sequence (one slot, every pool): {format_bytes(config.slot_bytes)} ({config.slot_bytes} bytes)")
    if budget is not None:
        _warn_if_beyond_any_device("the budget", budget)
        print(f"largest batch within {format_bytes(budget)} ({budget} bytes) per rank: {fits}")
        if fits == 0:
            print(
                _wrap(
                    f"nothing fits: one sequence needs {format_bytes(config.slot_bytes)} per rank, more than the "
                    f"budget of {format_bytes(budget)}; a smaller state dtype, --tp or --mtp may fit (table below)"
                )
            )
        print()
        print("\n".join(_capacity_lines(preset, args, budget)))
    if args.prefix_entries is not None or args.host_entries:
        _plan_prefix(args, config)
    return 0


def _plan_prefix(args, config) -> None:
    from .prefix.plan import entry_bytes, prefix_entries_for, prefix_memory_table

    entries = args.prefix_entries or 0
    size = entry_bytes(config)
    print(f"\nprefix-state store: one entry (one slot of every layer) is {format_bytes(size)} ({size} bytes)")
    print(prefix_memory_table(config, entries, args.host_entries))
    if args.budget is not None:
        print(
            f"prefix entries within {format_bytes(args.budget)} per rank beside batch {args.batch}: "
            f"{prefix_entries_for(config, args.budget)}"
        )


def _presets(args) -> int:
    blocks = []
    for name, preset in PRESETS.items():
        config = preset.config(1)
        recurrent, conv = (np.dtype(preset.recurrent_state_dtype).name, np.dtype(preset.conv_state_dtype).name)
        groups = f"{preset.n_groups} group{'s' * (preset.n_groups != 1)}"
        lines = [
            _wrap(preset.description, " " * 4, first=f"{name}: "),
            _wrap(
                f"{preset.mixer}, {preset.num_recurrent_layers} recurrent layers, {preset.num_heads} heads x "
                f"{preset.head_dim} x {preset.state_size}, {groups}, {preset.conv_dim} conv channels x "
                f"{preset.conv_kernel}; one sequence: {format_bytes(config.slot_bytes)}",
                "    ",
                first="  dims: ",
            ),
            _wrap(
                f"recurrent {recurrent}, conv {conv}",
                "    ",
                first="  planning dtypes: ",
            ),
            _wrap(
                f"recurrent {preset.shipped_dtypes[0]}, conv {preset.shipped_dtypes[1]}",
                "    ",
                first="  shipped state dtypes: ",
            ),
            _wrap(preset.dtype_source, "    ", first="    source: "),
        ]
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(["--backend", args.backend])


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mamba-cache plan: argument --batch: ...`` and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


_VALUE_OPTIONS = ("--budget", "--batch", "--mtp", "--tp", "--layers")


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--budget -5GiB`` -> ``--budget=-5GiB``, so a negative value reaches the range check, not argparse's."""
    out = []
    for arg in argv:
        if out and out[-1] in _VALUE_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    """Entry point of ``mamba-cache``."""
    argv = _glue_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = _Parser(prog="mamba-cache", description="Recurrent-state cache tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    plan = commands.add_parser("plan", help="bytes of every cache pool for a model preset, and the batch a budget fits")
    plan.add_argument("--preset", required=True, choices=sorted(PRESETS))
    plan.add_argument("--batch", type=int, default=8, help="slots (max_batch_size), default 8")
    plan.add_argument("--mtp", type=int, default=0, help="MTP verify length (max_intermediate_seq_len), default 0")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, default 1")
    dtypes = "float16, bfloat16, float32, float64, float8_e4m3fn, float8_e5m2 or int8"
    plan.add_argument("--dtype", help=f"state dtype of both kinds ({dtypes}); default: the preset's")
    plan.add_argument("--recurrent-dtype", help=f"recurrent state dtype ({dtypes}); overrides --dtype")
    plan.add_argument("--conv-dtype", help=f"conv state dtype ({dtypes}); overrides --dtype")
    plan.add_argument(
        "--budget",
        type=_size,
        help=f"memory per rank for the cache, {SIZE_FORMS}: print the largest batch that fits",
    )
    plan.add_argument(
        "--commit-mode",
        choices=list(PER_STEP_BUFFERS),
        default="scatter",
        help="how an MTP verify pass is committed: scatter keeps every per-step state, replay a small stash "
        "and recomputes (default scatter); the plan compares every mode",
    )
    plan.add_argument("--prefix-entries", type=int, help="device entries of a prefix-state store: its rows and bytes")
    plan.add_argument("--host-entries", type=int, default=0, help="host-tier entries of the prefix-state store")
    plan.set_defaults(run=_plan)
    commands.add_parser("presets", help="list the model presets").set_defaults(run=_presets)
    demo = commands.add_parser("demo", help="run the demonstration (as make demo)")
    demo.add_argument("--backend", choices=["auto", "numpy", "numba"], default="auto")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
