"""Draw docs/img/strategies.svg: bytes per accepted token of checkpoint mode against its ring length R.

    python benchmarks/plot_strategies.py [-o docs/img/strategies.svg]

From `mamba_cache.traffic` (a count, not a measurement): per preset, checkpoint mode's state bytes per
accepted token over R, as a fraction of scatter mode's, for plain decoding (V = 1) and speculative
decoding (V = 4, accept lengths uniform on 1..4, 1,000 passes, seed 0); replay mode and scatter mode
as lines. Plain SVG, no plotting library; tests/test_traffic.py checks the committed file is current.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mamba_cache.presets import PRESETS  # noqa: E402
from mamba_cache.traffic import best_history_len, state_traffic  # noqa: E402

PRESET_COLOURS = {"nemotron-h-8b": "#1f77b4", "qwen3-next-80b-a3b": "#d62728"}
WIDTH, HEIGHT, PANEL, TOP, LEFT, BOTTOM = 860, 390, 380, 40, 60, 80
Y_MAX = 1.6


def runs(verify: int) -> dict:
    """Per preset: (its config at batch 32, the run of accept lengths): 1,000 passes, seed 0, presets in turn."""
    rng = np.random.default_rng(0)
    out = {}
    for name in PRESET_COLOURS:
        accepts = [1] * 1000 if verify == 1 else rng.integers(1, verify + 1, 1000).tolist()
        out[name] = (PRESETS[name].config(batch=32, mtp=verify), accepts)
    return out


def curves(verify: int) -> dict:
    """Per preset: (R values, checkpoint ratios, replay ratio) against scatter mode."""
    out = {}
    for name, (config, accepts) in runs(verify).items():
        scatter = state_traffic(config, "scatter", accepts).bytes_per_token
        rings = list(range(verify, 64 + 1))
        ratios = [state_traffic(config, "checkpoint", accepts, history_len=r).bytes_per_token / scatter for r in rings]
        out[name] = (rings, ratios, state_traffic(config, "replay", accepts).bytes_per_token / scatter)
    return out


def panel(x0: int, title: str, data: dict) -> list[str]:
    inner_w, inner_h = PANEL - LEFT, HEIGHT - TOP - BOTTOM

    def xy(r: float, ratio: float) -> tuple[float, float]:
        return x0 + LEFT + (r - 1) / 63 * inner_w, TOP + (1 - min(ratio, Y_MAX) / Y_MAX) * inner_h

    parts = [
        f'<text x="{x0 + LEFT + inner_w / 2}" y="{TOP - 16}" text-anchor="middle" font-weight="bold">{title}</text>'
    ]
    parts.append(f'<rect x="{x0 + LEFT}" y="{TOP}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#444"/>')
    for tick in (0.0, 0.4, 0.8, 1.2, 1.6):
        _, y = xy(1, tick)
        parts.append(f'<line x1="{x0 + LEFT - 4}" y1="{y:.1f}" x2="{x0 + LEFT}" y2="{y:.1f}" stroke="#444"/>')
        parts.append(f'<text x="{x0 + LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    for r in (1, 16, 32, 48, 64):
        x, _ = xy(r, 0)
        parts.append(f'<line x1="{x:.1f}" y1="{TOP + inner_h}" x2="{x:.1f}" y2="{TOP + inner_h + 4}" stroke="#444"/>')
        parts.append(f'<text x="{x:.1f}" y="{TOP + inner_h + 18}" text-anchor="middle">{r}</text>')
    label_y = TOP + inner_h + 36
    parts.append(f'<text x="{x0 + LEFT + inner_w / 2}" y="{label_y}" text-anchor="middle">ring length R</text>')
    _, y1 = xy(1, 1.0)
    parts.append(f'<line x1="{x0 + LEFT}" y1="{y1:.1f}" x2="{x0 + LEFT + inner_w}" y2="{y1:.1f}" stroke="#888"/>')
    parts.append(f'<text x="{x0 + LEFT + inner_w - 4}" y="{y1 - 5:.1f}" text-anchor="end" fill="#666">scatter</text>')
    for above, (name, (rings, ratios, replay)) in enumerate(data.items()):
        colour = PRESET_COLOURS[name]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(r, v) for r, v in zip(rings, ratios, strict=True)))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        _, yr = xy(1, replay)
        line = f'x1="{x0 + LEFT}" y1="{yr:.1f}" x2="{x0 + LEFT + inner_w}" y2="{yr:.1f}"'
        parts.append(f'<line {line} stroke="{colour}" stroke-dasharray="5,4"/>')
        best = min(range(len(rings)), key=lambda i: ratios[i])
        bx, by = xy(rings[best], ratios[best])
        parts.append(f'<circle cx="{bx:.1f}" cy="{by:.1f}" r="4" fill="{colour}"/>')
        ty = by - 10 if above == 0 else by + 18  # the first preset's label above its dot, the second's below
        parts.append(f'<text x="{bx + 6:.1f}" y="{ty:.1f}" fill="{colour}">R={rings[best]}: {ratios[best]:.2f}</text>')
    return parts


def svg() -> str:
    body = [f'<text x="14" y="{TOP + 120}" transform="rotate(-90 14 {TOP + 120})">bytes / token vs scatter</text>']
    body += panel(0, "plain decoding (V = 1)", curves(1))
    body += panel(PANEL + 40, "speculative decoding (V = 4)", curves(4))
    legend_y = HEIGHT - 10
    x = LEFT
    for name, colour in PRESET_COLOURS.items():
        body.append(
            f'<line x1="{x}" y1="{legend_y - 4}" x2="{x + 18}" y2="{legend_y - 4}" stroke="{colour}" stroke-width="2"/>'
        )
        body.append(f'<text x="{x + 22}" y="{legend_y}">{name}</text>')
        x += 170
    body.append(
        f'<text x="{x}" y="{legend_y}" fill="#666">solid: checkpoint mode; dashed: replay mode; dot: best R</text>'
    )
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}"'
            ' font-family="sans-serif" font-size="12">')  # fmt: skip
    return "\n".join([head, '<rect width="100%" height="100%" fill="white"/>', *body, "</svg>"]) + "\n"


def table() -> str:
    """The "When each wins" table of docs/concepts/strategies.md (Markdown), from the plot's runs.

    Per preset and V: scatter, replay and checkpoint mode at its best R (`best_history_len`), in MiB
    per accepted token, as a fraction of scatter's, and MiB per slot; tests/test_traffic.py checks the
    page holds it.
    """
    rows = ["| preset | V | mode | R | MiB per accepted token | vs scatter | MiB per slot |", "| --- " * 7 + "|"]
    for name in PRESET_COLOURS:
        for verify in (1, 4):
            config, accepts = runs(verify)[name]
            scatter = state_traffic(config, "scatter", accepts)
            modes = [
                ("scatter (in place)" if verify == 1 else "scatter", scatter),
                ("replay" if verify == 1 else f"replay (= checkpoint, R = {verify})",
                 state_traffic(config, "replay", accepts)),
                ("checkpoint", best_history_len(config, accepts)),
            ]  # fmt: skip
            for mode, run in modes:
                ring = run.history_len if mode == "checkpoint" else "-"
                ratio = run.bytes_per_token / scatter.bytes_per_token
                rows.append(f"| {name} | {verify} | {mode} | {ring} | {run.bytes_per_token / 2**20:.1f} | "
                            f"{ratio:.2f} | {run.slot_bytes / 2**20:.1f} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "img" / "strategies.svg"))
    parser.add_argument("--table", action="store_true", help="print the strategies page's table instead")
    args = parser.parse_args(argv)
    if args.table:
        print(table(), end="")
        return 0
    pathlib.Path(args.output).write_text(svg())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
