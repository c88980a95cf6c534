"""Memory planning for the prefix-state store: what ``P`` device and ``P_host`` host entries take."""

from __future__ import annotations

import numpy as np

from .._config import Config, ConfigError, format_bytes

__all__ = ["entry_bytes", "prefix_entries_for", "prefix_memory_table"]


def entry_bytes(config: Config) -> int:
    """Bytes of one store entry: one slot of the recurrent and conv state of every layer (8-bit: with scales)."""
    if not config.enabled:
        return 0
    layers = config.num_recurrent_layers
    extra = sum(
        int(np.prod(shape[2:])) * dtype.itemsize
        for name, (shape, dtype) in config.scale_pools().items()
        if "intermediate" not in name
    )
    return layers * (
        config.recurrent_slot_elems * config.recurrent_state_dtype.itemsize
        + config.conv_slot_elems * config.conv_state_dtype.itemsize
        + extra
    )


def prefix_entries_for(config: Config, budget_bytes: int) -> int:
    """How many device entries fit in ``budget_bytes`` once the config's own pools are allocated.

    Raises:
        ConfigError: the config has no layers, or ``budget_bytes`` is negative.
    """
    if not config.enabled:
        raise ConfigError("num_recurrent_layers must be >= 1 to size a prefix store")
    if budget_bytes < 0:
        raise ConfigError(f"budget_bytes must be >= 0, got {budget_bytes}")
    return max(0, budget_bytes - config.total_bytes) // entry_bytes(config)


def prefix_memory_table(config: Config, entries: int, host_entries: int = 0) -> str:
    """Rows of the store's pools (per-layer shape, dtype, bytes) in the style of ``Config.memory_table``."""
    if entries < 0 or host_entries < 0:
        raise ConfigError(f"entries and host_entries must be >= 0, got {entries} and {host_entries}")
    layers = config.num_recurrent_layers
    rec_shape = (entries, *config.recurrent_state_shape[1:])
    conv_shape = (entries, *config.conv_state_shape[1:])
    rec = layers * entries * config.recurrent_slot_elems * config.recurrent_state_dtype.itemsize
    conv = layers * entries * config.conv_slot_elems * config.conv_state_dtype.itemsize
    host = host_entries * entry_bytes(config)
    rows = [("pool", "per-layer shape", "dtype", "bytes")]
    rows.append(("prefix_recurrent", _shape(rec_shape), np.dtype(config.recurrent_state_dtype).name, format_bytes(rec)))
    rows.append(("prefix_conv", _shape(conv_shape), np.dtype(config.conv_state_dtype).name, format_bytes(conv)))
    if host_entries:
        rows.append(("prefix_host (pinned host)", f"{host_entries} entries", "as above", format_bytes(host)))
    rows.append(
        (f"device total with the store ({entries} entries)", "", "", format_bytes(config.total_bytes + rec + conv))
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _shape(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"
