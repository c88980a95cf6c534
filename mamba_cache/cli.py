"""The ``mamba-cache`` command line: memory planning for real models, and the demo."""

from __future__ import annotations

import argparse
import sys

from ._config import ConfigError, format_bytes
from .presets import PRESETS, parse_bytes


def _plan(args) -> int:
    preset = PRESETS[args.preset]
    try:
        config = preset.config(args.batch, args.mtp, args.tp)
    except ConfigError as error:
        print(f"mamba-cache plan: {error}", file=sys.stderr)
        return 2
    print(f"{preset.description}")
    print(
        f"batch {args.batch}, MTP verify length {args.mtp}, tensor parallel {args.tp} "
        f"(per rank: {config.recurrent_state_num_heads} heads, {config.conv_dim} conv channels)\n"
    )
    print(config.memory_table())
    print(f"\nper sequence (one slot, every pool): {format_bytes(config.slot_bytes)} ({config.slot_bytes} bytes)")
    if args.budget is not None:
        budget = parse_bytes(args.budget)
        fits = config.max_batch_size_for(budget)
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
    return 0


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(["--backend", args.backend])


def main(argv=None) -> int:
    """Entry point of ``mamba-cache``."""
    parser = argparse.ArgumentParser(prog="mamba-cache", description="Recurrent-state cache tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan = commands.add_parser("plan", help="bytes of every cache pool for a model preset, and the batch a budget fits")
    plan.add_argument("--preset", required=True, choices=sorted(PRESETS))
    plan.add_argument("--batch", type=int, default=8, help="slots (max_batch_size), default 8")
    plan.add_argument("--mtp", type=int, default=0, help="MTP verify length (max_intermediate_seq_len), default 0")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, default 1")
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
