"""Where a benchmark run writes its records: a new file per run, never over an earlier run's."""

from __future__ import annotations

import datetime
import pathlib


def new_results_path(
    out: str | pathlib.Path, kind: str, card: str | None = None, suffix: str = ".json"
) -> pathlib.Path:
    """``<out>/<kind>[-<card>]-<date><suffix>``, or with ``-2``, ``-3``, ... before the suffix if taken.

    A second run on the same day (a partial one included) gets its own file, so it can never replace
    the records of the first.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "-".join(part for part in (kind, card and card.replace(" ", "_"), datetime.date.today().isoformat()) if part)
    path, n = out / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = out / f"{stem}-{n}{suffix}"
    return path
