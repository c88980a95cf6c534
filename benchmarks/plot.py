"""Plot a results JSON of run.py: ratio to the measured ceiling, and speed-up over PyTorch.

    python benchmarks/plot.py benchmarks/results/results-<card>-<date>.json [-o docs/img/benchmarks.svg]

Needs matplotlib (not a dependency of the library).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OPS = {"scatter_mtp_states": "scatter", "clear_states": "clear (vs memset)", "capture_states": "capture"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("-o", "--output", default="docs/img/benchmarks.svg")
    args = parser.parse_args()
    data = json.loads(pathlib.Path(args.results).read_text())
    records, meta = data["records"], data["meta"]
    configs = list(dict.fromkeys(r["config"] for r in records))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(OPS)
    for i, (op, label) in enumerate(OPS.items()):
        ratios = [next(r["ratio_to_ceiling"] for r in records if r["config"] == c and r["op"] == op) for c in configs]
        bars = left.bar([x + i * width for x in range(len(configs))], ratios, width, label=label)
        left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="0.9 target")
    left.set_xticks([x + width for x in range(len(configs))], configs)
    left.set_ylabel("useful bandwidth / ceiling")
    left.set_title("Numba backend vs. copy / memset ceiling (same run)")
    left.set_ylim(0, 1.25)
    # legends below the axes, never over the bars
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    scatter = [next(r for r in records if r["config"] == c and r["op"] == "scatter_mtp_states") for c in configs]
    stacked = right.bar(
        [x - 0.2 for x in range(len(configs))],
        [r["speedup_vs_torch_stacked"] for r in scatter],
        0.4,
        label="torch stacked indexing",
    )
    per_layer = right.bar(
        [x + 0.2 for x in range(len(configs))],
        [r["speedup_vs_torch_per_layer"] for r in scatter],
        0.4,
        label="torch per-layer loop",
    )
    right.bar_label(stacked, fmt="%.1fx", fontsize=8)
    right.bar_label(per_layer, fmt="%.1fx", fontsize=8)
    right.set_yscale("log")
    speedups = [r[k] for r in scatter for k in ("speedup_vs_torch_stacked", "speedup_vs_torch_per_layer")]
    right.set_ylim(1, max(speedups) * 2.5)  # room for the labels above the tallest bar
    right.set_xticks(range(len(configs)), configs)
    right.set_title("scatter_mtp_states speed-up over PyTorch")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.suptitle(f"{meta['card']}, {meta['date']}: copy ceiling {meta['copy_ceiling_gbps']:.0f} GB/s", fontsize=10)
    fig.tight_layout()
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Date": None}, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
