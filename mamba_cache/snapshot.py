"""Snapshots on disk: one slot's states of every layer (a system-prompt cache entry).

File format (``.npz``, readable by any NumPy, and by other languages as a zip of ``.npy`` files):

    meta              a 0-d unicode array holding JSON: {"format": "mamba_cache.snapshot",
                      "version": 1, "config": {the shape-determining Config fields},
                      "layers": L, "sha256": hex digest of every array's bytes in file order}
    recurrent_<l>     [1, H, D, N], recurrent dtype, for l = 0 .. L-1
    conv_<l>          [1, C, K], conv dtype

A bfloat16 state (which ``.npy`` cannot name) is stored as uint16 raw bits; the config in ``meta``
says ``bfloat16`` and loading views the bits as bfloat16 again (a float8 state likewise as uint8).

With 8-bit states the file also holds the slot's scales and residuals, ``[L, 1, ...]`` each, under
the names of [`capture_scales`][mamba_cache.MambaCacheManagerBase.capture_scales]
(``scales_recurrent``, ``scales_conv``, ``residual_recurrent``); ``meta`` lists them under
``"scales"`` and the checksum covers them after the states.

A file is loaded only into a cache whose layer count, shapes and dtypes match (the batch size and
MTP length may differ), and only if its checksum matches: anything else raises
[`SnapshotError`][mamba_cache.snapshot.SnapshotError] before any state is touched.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from typing import Any

import numpy as np

from ._config import Config

__all__ = ["SnapshotError", "save_snapshot", "load_snapshot"]

FORMAT, VERSION = "mamba_cache.snapshot", 1
#: The Config fields a snapshot must agree on (the batch size and MTP length need not).
SHAPE_FIELDS = (
    "num_recurrent_layers",
    "recurrent_state_num_heads",
    "recurrent_state_head_dim",
    "recurrent_state_size",
    "conv_dim",
    "conv_kernel",
    "recurrent_state_dtype",
    "conv_state_dtype",
)


class SnapshotError(ValueError):
    """A snapshot file is corrupted, not a snapshot, or does not fit the cache."""


def _describe(config: Config) -> dict:
    return {f: (getattr(config, f).name if f.endswith("dtype") else getattr(config, f)) for f in SHAPE_FIELDS}


def _digest(arrays: list[np.ndarray]) -> str:
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def _scale_shapes(config: Config) -> dict:
    """The ``[L, 1, ...]`` shape and dtype of each scale / residual pool a slot of ``config`` carries."""
    return {
        name: ((shape[0], 1, *shape[2:]), dtype)
        for name, (shape, dtype) in config.scale_pools().items()
        if "intermediate" not in name
    }


def _raw(array: np.ndarray) -> np.ndarray:
    """``array``, or its unsigned raw bits for a dtype ``.npy`` cannot name (bfloat16, float8)."""
    return (
        array.view(f"u{array.itemsize}") if array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else array
    )


def save_snapshot(path: Any, config: Config, recurrent_states: list, conv_states: list, scales: Any = None) -> None:
    """Write one slot's captured states, with the config and a checksum, to ``path``.

    Args:
        path: a file name or a binary file object.
        config: the cache's config.
        recurrent_states: L host arrays ``[1, H, D, N]`` (``capture_recurrent_states``, on the host).
        conv_states: L host arrays ``[1, C, K]``.
        scales: an 8-bit cache only, and required there: ``{name: [L, 1, ...] host array}`` as
            ``capture_scales`` returns them.

    Raises:
        ValueError: the lists (or the scales) do not match the config.
    """
    layers = config.num_recurrent_layers
    expected = [((1, *config.recurrent_state_shape[1:]), config.recurrent_state_dtype)] * layers + [
        ((1, *config.conv_state_shape[1:]), config.conv_state_dtype)
    ] * layers
    arrays = [np.asarray(a) for a in (*recurrent_states, *conv_states)]
    if len(recurrent_states) != layers or len(conv_states) != layers:
        raise ValueError(
            f"a snapshot needs {layers} recurrent and {layers} conv arrays, got "
            f"{len(recurrent_states)} and {len(conv_states)}"
        )
    for array, (shape, dtype) in zip(arrays, expected, strict=True):
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"snapshot array {array.shape} {array.dtype} does not match the config's {shape} {dtype}")
    names = [f"recurrent_{i}" for i in range(layers)] + [f"conv_{i}" for i in range(layers)]
    wanted = _scale_shapes(config)
    given = {} if scales is None else dict(scales)
    if sorted(given) != sorted(wanted):
        raise ValueError(f"a snapshot of this config needs the scales {sorted(wanted)}, got {sorted(given)}")
    for name, (shape, dtype) in wanted.items():
        array = np.asarray(given[name])
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(
                f"snapshot scales {name} {array.shape} {array.dtype} do not match the config's {shape} {dtype}"
            )
        names.append(name)
        arrays.append(array)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": _describe(config),
        "layers": layers,
        "sha256": _digest(arrays),
    }
    if wanted:
        meta["scales"] = list(wanted)
    stored = [_raw(a) for a in arrays]
    np.savez(path, meta=np.array(json.dumps(meta)), **dict(zip(names, stored, strict=True)))


def load_snapshot(path: Any, config: Config) -> tuple:
    """Read and check a snapshot; return (recurrent states, conv states) as host arrays.

    With 8-bit states a third item: the scales and residuals, ``{name: [L, 1, ...]}``.

    Args:
        path: a file name or a binary file object.
        config: the config of the cache it will be loaded into.

    Raises:
        SnapshotError: unreadable or corrupted file, wrong format or version, a config that does not
            match (the message names the first field that differs), or a checksum mismatch.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"][()]))
            layers = int(meta["layers"])
            names = [f"recurrent_{i}" for i in range(layers)] + [f"conv_{i}" for i in range(layers)]
            names += list(meta.get("scales", []))
            arrays = [data[name] for name in names]
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as error:
        raise SnapshotError(f"not a readable mamba_cache snapshot: {error}") from error
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise SnapshotError(
            f"not a {FORMAT} version {VERSION} file (format {meta.get('format')!r}, version {meta.get('version')!r})"
        )
    missing = [key for key in ("config", "sha256") if key not in meta]
    if missing or not isinstance(meta["config"], dict):
        raise SnapshotError(f"not a complete {FORMAT} file: its metadata lacks {', '.join(missing) or 'a config'}")
    ours = _describe(config)
    for field in SHAPE_FIELDS:
        if meta["config"].get(field) != ours[field]:
            theirs = meta["config"].get(field)
            raise SnapshotError(
                f"snapshot was saved from another config: {field} is {theirs!r} there, {ours[field]!r} here"
            )
    wanted = _scale_shapes(config)
    if list(meta.get("scales", [])) != list(wanted):
        raise SnapshotError(
            f"snapshot was saved with the scales {meta.get('scales', [])}, this config needs {list(wanted)}"
        )
    if _digest(arrays) != meta["sha256"]:
        raise SnapshotError("snapshot checksum mismatch: the file is corrupted")
    dtypes = [config.recurrent_state_dtype] * layers + [config.conv_state_dtype] * layers
    dtypes += [dtype for _, dtype in wanted.values()]
    leading = [(1,)] * (2 * layers) + [shape[:2] for shape, _ in wanted.values()]
    for array, dtype, lead in zip(arrays, dtypes, leading, strict=True):
        if array.dtype.itemsize != dtype.itemsize or array.shape[: len(lead)] != lead:
            raise SnapshotError(f"snapshot array {array.shape} {array.dtype} does not fit the config's {dtype.name}")
    arrays = [a.view(d) if a.dtype != d else a for a, d in zip(arrays, dtypes, strict=True)]
    if wanted:
        return arrays[:layers], arrays[layers : 2 * layers], dict(zip(wanted, arrays[2 * layers :], strict=True))
    return arrays[:layers], arrays[layers:]
