"""The ``mamba-cache`` command line: memory planning for real models, and the demo."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ._config import ConfigError, format_bytes
from .presets import PRESETS, parse_bytes

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


def _plan(args) -> int:
    preset = PRESETS[args.preset]
    try:  # every input is checked before anything is printed
        config = preset.config(args.batch, args.mtp, args.tp)
        dtypes = {
            "recurrent_state_dtype": args.recurrent_dtype or args.dtype,
            "conv_state_dtype": args.conv_dtype or args.dtype,
        }
        dtypes = {field: value for field, value in dtypes.items() if value}
        # the per-step pools follow the main dtype (None)
        dtypes.update({f"intermediate_{field}": None for field in list(dtypes)})
        if dtypes:
            config = dataclasses.replace(config, **dtypes)
        budget = None if args.budget is None else parse_bytes(args.budget)
        fits = None if budget is None else config.max_batch_size_for(budget)
    except (ConfigError, ValueError) as error:
        print(f"mamba-cache plan: {error}", file=sys.stderr)
        return 2
    _warn_if_beyond_any_device("the cache", config.total_bytes)
    print(f"{preset.description}")
    print(preset.shipped())
    print(
        f"batch {args.batch}, MTP verify length {args.mtp}, tensor parallel {args.tp}\n"
        f"per rank: {config.recurrent_state_num_heads} heads, {config.conv_dim} conv channels\n"
    )
    print(config.memory_table())
    print(f"\nper sequence (one slot, every pool): {format_bytes(config.slot_bytes)} ({config.slot_bytes} bytes)")
    if budget is not None:
        _warn_if_beyond_any_device("the budget", budget)
        print(f"largest batch within {format_bytes(budget)} ({budget} bytes) per rank: {fits}")
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
        budget = parse_bytes(args.budget)
        print(
            f"prefix entries within {format_bytes(budget)} per rank beside batch {args.batch}: "
            f"{prefix_entries_for(config, budget)}"
        )


def _presets(args) -> int:
    for name, preset in PRESETS.items():
        print(f"{name:<20} {preset.description}")
        print(f"{'':<20} {preset.shipped()}")
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
    dtypes = "float16, bfloat16, float32 or float64"
    plan.add_argument("--dtype", help=f"state dtype of both kinds ({dtypes}); default: the preset's")
    plan.add_argument("--recurrent-dtype", help=f"recurrent state dtype ({dtypes}); overrides --dtype")
    plan.add_argument("--conv-dtype", help=f"conv state dtype ({dtypes}); overrides --dtype")
    plan.add_argument("--budget", help="bytes per rank for the cache, e.g. 20GiB: print the largest batch that fits")
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
