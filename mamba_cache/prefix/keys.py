"""Keys of prefix checkpoints: a chain of block digests over the token ids.

A recurrent state exists only for the exact prefix it was computed after, so a checkpoint's key
must name the whole prefix, not just its last block. With block size ``bs``:

```text
d_0 = blake2b(namespace.encode("utf-8"), digest_size=16)
d_i = blake2b(d_{i-1} || tokens[(i-1)*bs : i*bs] as int32 little-endian, digest_size=16)
```

The checkpoint taken after ``n * bs`` tokens has key ``d_n``. The namespace separates models and
adapters whose states differ for the same tokens.

A checkpoint off the block grid, after ``n = q * bs + r`` tokens with ``0 < r < bs``, has a tail key:

```text
t_n = blake2b(d_q || tokens[q*bs : n] as int32 little-endian, digest_size=16, person=b"tail")
```

The personalisation keeps tail keys apart from block keys (a tail of ``r`` tokens and a block of
``r`` tokens never share a key), and grid keys are unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["block_digests", "digest_chain", "prefix_key", "root_digest", "tail_digest", "token_array"]

#: Bytes of each digest.
DIGEST_SIZE = 16
#: The blake2b personalisation of tail keys (padded with zeros to 16 bytes by blake2b).
TAIL_PERSON = b"tail"
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


def tail_digest(block_digest: bytes, tail: np.ndarray) -> bytes:
    """The key of an off-grid length: ``blake2b(d_q || tail, digest_size=16, person=b"tail")``.

    Args:
        block_digest: ``d_q``, the chain digest of the ``q`` whole blocks before the tail (``d_0``:
            the namespace's root digest).
        tail: the ``r`` tokens after them (``0 < r < bs``), checked int32 (``token_array``'s result
            or a slice of it).
    """
    hasher = hashlib.blake2b(block_digest, digest_size=DIGEST_SIZE, person=TAIL_PERSON)
    hasher.update(memoryview(np.ascontiguousarray(tail, dtype=_LE_INT32)).cast("B"))
    return hasher.digest()


def prefix_key(tokens: Any, block_size: int, namespace: str = "") -> bytes:
    """The key of the checkpoint after all of ``tokens`` (any length >= 1): ``d_n`` on the grid, else ``t_n``.

    Raises:
        ValueError: ``tokens`` is empty (there is no state after zero tokens to key), or as
            [`token_array`][mamba_cache.prefix.keys.token_array].
    """
    data = token_array("tokens", tokens)
    if not data.shape[0]:
        raise ValueError("tokens must hold at least 1 token to name a checkpoint, got 0")
    whole, rest = divmod(data.shape[0], block_size)
    chain = [root_digest(namespace), *digest_chain(data, block_size, root_digest(namespace), whole)]
    return chain[-1] if not rest else tail_digest(chain[-1], data[whole * block_size :])
