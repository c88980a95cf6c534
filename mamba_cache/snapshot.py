"""Snapshots on disk: one slot's states of every layer (a system-prompt cache entry).

File format (``.npz``, readable by any NumPy, and by other languages as a zip of ``.npy`` files):

    meta              a 0-d unicode array holding JSON: {"format": "mamba_cache.snapshot",
                      "version": 1, "config": {the shape-determining Config fields},
                      "layers": L, "sha256": hex digest of every array's bytes in file order}
    recurrent_<l>     [1, H, D, N], recurrent dtype, for l = 0 .. L-1
    conv_<l>          [1, C, K], conv dtype

A bfloat16 state (which ``.npy`` cannot name) is stored as uint16 raw bits; the config in ``meta``
says ``bfloat16`` and loading views the bits as bfloat16 again.

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


def save_snapshot(path: Any, config: Config, recurrent_states: list, conv_states: list) -> None:
    """Write one slot's captured states, with the config and a checksum, to ``path``.

    Args:
        path: a file name or a binary file object.
        config: the cache's config.
        recurrent_states: L host arrays ``[1, H, D, N]`` (``capture_recurrent_states``, on the host).
        conv_states: L host arrays ``[1, C, K]``.

    Raises:
        ValueError: the lists do not match the config.
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
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": _describe(config),
        "layers": layers,
        "sha256": _digest(arrays),
    }
    stored = [a.view(np.uint16) if a.dtype.name == "bfloat16" else a for a in arrays]
    np.savez(path, meta=np.array(json.dumps(meta)), **dict(zip(names, stored, strict=True)))


def load_snapshot(path: Any, config: Config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Read and check a snapshot; return (recurrent states, conv states) as host arrays.

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
    if _digest(arrays) != meta["sha256"]:
        raise SnapshotError("snapshot checksum mismatch: the file is corrupted")
    dtypes = [config.recurrent_state_dtype] * layers + [config.conv_state_dtype] * layers
    for array, dtype in zip(arrays, dtypes, strict=True):
        if array.dtype.itemsize != dtype.itemsize or array.shape[:1] != (1,):
            raise SnapshotError(f"snapshot array {array.shape} {array.dtype} does not fit the config's {dtype.name}")
    arrays = [a.view(d) if a.dtype != d else a for a, d in zip(arrays, dtypes, strict=True)]
    return arrays[:layers], arrays[layers:]
