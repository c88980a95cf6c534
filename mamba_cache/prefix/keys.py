"""Keys of prefix checkpoints: a chain of block digests over the token ids.

A recurrent state exists only for the exact prefix it was computed after, so a checkpoint's key
must name the whole prefix, not just its last block. With block size ``bs``:

```text
d_0 = blake2b(namespace.encode("utf-8"), digest_size=16)
d_i = blake2b(d_{i-1} || tokens[(i-1)*bs : i*bs] as int32 little-endian, digest_size=16)
```

The checkpoint taken after ``n * bs`` tokens has key ``d_n``. The namespace separates models and
adapters whose states differ for the same tokens.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["block_digests", "digest_chain", "root_digest", "token_array"]

#: Bytes of each digest.
DIGEST_SIZE = 16
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_LE_INT32 = np.dtype("<i4")


def token_array(name: str, tokens: Any) -> np.ndarray:
    """``tokens`` as a 1-D host int32 array, little-endian; raise naming ``name`` if it cannot be one.

    Accepts any 1-D sequence of integers (a list, a NumPy integer array) whose values fit int32.

    Raises:
        TypeError: not integers (floats, bools, a device array, ...).
        ValueError: not 1-D, or a value outside the int32 range.
    """
    if type(tokens) is np.ndarray and tokens.dtype == _LE_INT32 and tokens.ndim == 1 and tokens.flags.c_contiguous:
        return tokens  # already what the keys hash (the fast path of a serving loop)
    if hasattr(tokens, "__cuda_array_interface__"):
        raise TypeError(f"{name} must be host token ids (a list or numpy array), got a device array")
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D token ids, got shape {tuple(array.shape)}")
    if array.size and (array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold integer token ids, got dtype {array.dtype.name}")
    if array.size and (int(array.min()) < _INT32_MIN or int(array.max()) > _INT32_MAX):
        raise ValueError(f"{name} must hold int32 token ids, got values in [{int(array.min())}, {int(array.max())}]")
    return np.ascontiguousarray(array, dtype="<i4")


def root_digest(namespace: str) -> bytes:
    """``d_0``: the 16-byte blake2b digest of the namespace's UTF-8 bytes."""
    return hashlib.blake2b(namespace.encode("utf-8"), digest_size=DIGEST_SIZE).digest()


def block_digests(tokens: Any, block_size: int, namespace: str = "", blocks: int | None = None) -> list[bytes]:
    """The chain ``[d_1, ..., d_n]`` over the first ``n`` whole blocks of ``tokens``.

    Args:
        tokens: 1-D integer token ids (host), each in the int32 range.
        block_size: ``bs``, tokens per block (>= 1).
        namespace: separates models / adapters (hashed into ``d_0``).
        blocks: ``n``; default: every whole block (``len(tokens) // bs``).

    Returns:
        ``n`` digests of 16 bytes; element ``i - 1`` is the key of the state after ``i * bs`` tokens.
    """
    data = token_array("tokens", tokens)
    whole = data.shape[0] // block_size
    count = whole if blocks is None else min(blocks, whole)
    return digest_chain(data, block_size, root_digest(namespace), count)


def digest_chain(data: np.ndarray, block_size: int, root: bytes, count: int) -> list[bytes]:
    """``[d_1, ..., d_count]`` from ``d_0 = root`` over checked tokens (``token_array``'s result).

    The unchecked core of [`block_digests`][mamba_cache.prefix.keys.block_digests], for callers that already hold
    checked tokens and the namespace's root digest (the store computes both once).
    """
    out = []
    digest = root
    view = memoryview(data).cast("B")  # no copy of the tokens
    step = 4 * block_size
    blake2b = hashlib.blake2b
    for i in range(count):
        hasher = blake2b(digest, digest_size=DIGEST_SIZE)
        hasher.update(view[i * step : (i + 1) * step])
        digest = hasher.digest()
        out.append(digest)
    return out
