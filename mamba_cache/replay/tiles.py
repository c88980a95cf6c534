"""The shared pieces of the tiled replay kernels: tile sizes, constants, row rules and the conv part.

[`mamba_cache.replay.tiled`][mamba_cache.replay.tiled] describes the kernels; the Mamba2 and Gated DeltaNet
kernel bodies are in `tiled_mamba2` and `tiled_gdn`, built on these.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda
from numba.np import numpy_support

from ..core.device import SIMULATOR, device_pointer
from .kernels import (
    MAX_KEY_DIM,
    ROUND_BF16,
    ROUND_HALF,
    ROUND_STORED,
    THREADS,
    _replay_conv,
    _step,
    _track_conv,
)

#: Most lanes side by side in a Mamba2 tile (a warp then covers up to ``WARP * CPT`` consecutive columns).
WARP = 32
#: Consecutive state rows (d) each Mamba2 thread keeps in registers: a float32 tile of ``RPT x CPT``
#: elements, 32 registers.
RPT = 4
#: ... when the tile is packed 16-bit pairs (`mamba2_packed`): ``PACKED_RPT x CPT`` elements,
#: 32 registers too.
PACKED_RPT = 8
#: Consecutive state columns (n) each Mamba2 thread keeps in registers: two uint64 words of a 16-bit
#: state, four of a float32 one.
CPT = 8
#: Conv channels per thread in the conv blocks.
CONV_CPT = 2
#: Widest conv window the conv blocks keep in registers (a wider one takes one channel per thread).
CONV_MAX_WIDTH = 4
#: Key-dim values each Gated DeltaNet thread keeps in registers (one part of a column).
PART = 32
#: Most parts of one column: ``MAX_KEY_DIM / PART``.
MAX_PARTS = MAX_KEY_DIM // PART
#: Resident blocks per SM the Gated DeltaNet kernel at D = 128 is built for (`gdn_launch_bounds`).
GDN_MIN_BLOCKS = 8
#: NVVM-level inlining of the step functions (Numba-level ``inline=True`` refuses a closure of this
#: many arguments); the simulator's ``jit`` takes no such option.
_FORCE_INLINE = {} if SIMULATOR else {"forceinline": True}


def mamba2_tiles(dim: int, size: int, rows: int) -> tuple[int, int, int, int]:
    """``(lanes, row_groups, d_tiles, n_tiles)`` of the tiled Mamba2 kernel for head dim D and state size N.

    ``lanes`` threads side by side cover ``lanes * CPT`` consecutive columns (``lanes`` the power of two >= ``N / CPT``,
    at most a warp), each thread `CPT` consecutive columns of ``rows`` consecutive rows
    ([`mamba2_rows`][mamba_cache.replay.tiles.mamba2_rows]); the ``row_groups = THREADS / lanes`` groups of lanes are
    stacked, so a block is ``row_groups * rows`` rows x ``lanes * CPT`` columns of one head.
    """
    lanes = min(WARP, 1 << max(0, (-(-size // CPT) - 1).bit_length()))
    row_groups = THREADS // lanes
    return lanes, row_groups, -(-dim // (row_groups * rows)), -(-size // (lanes * CPT))


def mamba2_rows(packed: bool) -> int:
    """Rows per Mamba2 thread: `PACKED_RPT` for a packed tile (`mamba2_packed`), else `RPT`."""
    return PACKED_RPT if packed else RPT


def mamba2_word_elems(pool: Any, size: int) -> int:
    """State elements per uint64 word the Mamba2 kernel loads and stores: 4 (16-bit), 2 (float32), or 0.

    0 (one element per access) unless the pool's elements are 2 or 4 bytes, ``N`` is a multiple of
    `CPT` (a thread's columns then start at a multiple of ``CPT`` in every row and slot) and
    the pool starts on an 8-byte boundary.
    """
    itemsize = pool.dtype.itemsize
    if itemsize not in (2, 4) or size % CPT or device_pointer(pool) % 8:
        return 0
    return 8 // itemsize


def mamba2_packed(rounding: int, bits16: int, word_elems: int) -> bool:
    """Whether the Mamba2 kernel keeps its tile packed, two 16-bit elements per uint32 register.

    So it does for a 16-bit state read as words (``word_elems`` 4) that every step rounds to its
    own format (float16: ``ROUND_HALF``; bfloat16, ``bits16``: ``ROUND_BF16``): the loaded words
    are the tile, each step unpacks a pair and rounds it back with one conversion, and the words
    are stored as they are. Stochastic rounding (``ROUND_STORED``) keeps float32 elements.
    """
    return word_elems == 4 and rounding == (ROUND_BF16 if bits16 else ROUND_HALF)


def gdn_parts(key_dim: int) -> int:
    """Threads sharing one Gated DeltaNet column: ``ceil(D / PART)`` rounded up to a power of two."""
    parts = -(-key_dim // PART)
    return 1 << max(0, (parts - 1).bit_length())


def gdn_launch_bounds(key_dim: int, rounding: int) -> tuple[int, int] | None:
    """The launch bounds ``(THREADS, GDN_MIN_BLOCKS)`` the Gated DeltaNet kernel is built with, or None.

    At D = 128 (four parts) without stochastic rounding the kernel needs 82 registers or more,
    so 6 blocks of 128 threads fit an SM; every step's prediction chain waits on the one before,
    part after part, so more blocks in flight is what hides it. Asking for 8 (at most 64
    registers) keeps a few scalars in local memory outside the step loops (``tests/test_replay.py``
    bounds the bytes) and on an H200 took the Qwen3-Next commit from 0.79 to 0.86 of the copy
    ceiling (``benchmarks/NOTES.md``). Other key dims and stochastic rounding keep the
    compiler's choice (there the bound spills inside the step loops, or is not needed).
    """
    return (THREADS, GDN_MIN_BLOCKS) if key_dim == 4 * PART and rounding != ROUND_STORED else None


@cuda.jit(device=True, inline=True)
def _stash_row_of_row(row, slot):
    return row


@cuda.jit(device=True, inline=True)
def _stash_row_of_slot(row, slot):
    return slot


def stash_row_rule(ring: bool) -> Any:
    """Which stash row (and ``positions`` entry) a kernel's row reads: its own, or (``ring``) its slot's.

    The replay commit reads stash row ``b * V + t`` and ``positions[b]`` for row ``b``. A kernel built
    with ``ring`` reads ``s * V + t`` and ``positions[s]`` for the row's slot ``s``: the stash is then a
    history ring ``[B, R, ...]`` indexed by slot (``V`` = ``R``, checkpoint mode's fold,
    `mamba_cache.checkpoint.kernels`). ``write_back=False`` (either rule) leaves the slot's state as it
    was and only stores the tracked state (`_track`) into its entry: the state after ``n`` steps computed
    into another array, the source untouched.
    """
    return _stash_row_of_slot if ring else _stash_row_of_row


@cuda.jit(device=True, inline=True)
def _u32(x):
    """``x`` as a 32-bit unsigned integer: index arithmetic in 32 bits, with no negative-index wrap."""
    return np.uint32(x)


@cuda.jit(device=True, inline=True)
def _at(first, r, pitch, offset):
    """Element ``first + r * pitch + offset``: the row in 32 bits, the constant ``offset`` added in 64."""
    return np.uint64(_u32(first + r * pitch)) + np.uint64(offset)  # so it becomes an address offset


def conv_chunks(channels: int, width: int) -> int:
    """The conv part's x blocks: `CONV_CPT` channels per thread (one for a window over `CONV_MAX_WIDTH`)."""
    per_thread = CONV_CPT if width <= CONV_MAX_WIDTH else 1
    return -(-channels // (THREADS * per_thread))


_CONV_TILES: dict = {}


def _conv_tile(width: int, conv_dtype: np.dtype, write_back: bool = True) -> Any:
    """The conv part of a replay block for a window of ``width`` and a conv pool dtype, cached.

    For ``width <= CONV_MAX_WIDTH`` a thread owns ``CONV_CPT`` channels ``THREADS`` apart, loads every
    value it will write (the new window, and the tracked one) into registers, then stores them: one
    memory round trip instead of one per window position (`_replay_conv`
    shifts in place, so each load waits for the store before it). A wider window takes that function,
    one channel per thread. Without ``write_back`` only the tracked window is stored.
    """
    key = (width if width <= CONV_MAX_WIDTH else 0, np.dtype(conv_dtype).str, bool(write_back))
    tile = _CONV_TILES.get(key)
    if tile is not None:
        return tile
    if not key[0]:

        @cuda.jit(device=True, inline=True)
        def tile(conv, col, track_conv, entry, tracked, layer, slot, row, seq_len, accepted, chunk, channels,
                 window_width, node_ids, use_nodes):  # fmt: skip
            c = chunk * THREADS + cuda.threadIdx.x
            if c < channels:
                if tracked >= 0:
                    _track_conv(
                        conv, col, track_conv, entry, layer, slot, row, seq_len, tracked, c, channels, window_width,
                        node_ids, use_nodes,
                    )  # fmt: skip
                if write_back:
                    _replay_conv(
                        conv, col, layer, slot, row, seq_len, accepted, c, channels, window_width, node_ids, use_nodes
                    )

    else:
        element = numpy_support.from_dtype(np.dtype(conv_dtype))
        cells = CONV_CPT * width

        @cuda.jit(device=True, inline=True)
        def extended(window, columns, base, p, c, row, seq_len, channels, node_ids, use_nodes):
            # position p of (window ++ accepted columns) for channel c
            if p < width:
                return window[base + p]
            return columns[_u32(_u32(_step(node_ids, use_nodes, row, seq_len, p - width)) * channels + c)]

        @cuda.jit(device=True, **_FORCE_INLINE)
        def tile(conv, col, track_conv, entry, tracked, layer, slot, row, seq_len, accepted, chunk, channels,
                 window_width, node_ids, use_nodes):  # fmt: skip
            window, columns = conv[layer, slot], col[layer]
            n_channels = _u32(channels)
            kept = cuda.local.array(cells, element)
            checkpoint = cuda.local.array(cells, element)
            for q in range(CONV_CPT):  # every load first
                c = _u32(_u32(chunk * CONV_CPT + q) * THREADS + cuda.threadIdx.x)
                if c < n_channels:
                    base = _u32(c * width)
                    for k in range(width):
                        kept[q * width + k] = extended(
                            window, columns, base, accepted + k, c, row, seq_len, n_channels, node_ids, use_nodes
                        )
                        if tracked >= 0:
                            checkpoint[q * width + k] = extended(
                                window, columns, base, tracked + 1 + k, c, row, seq_len, n_channels, node_ids,
                                use_nodes,
                            )  # fmt: skip
            for q in range(CONV_CPT):
                c = _u32(_u32(chunk * CONV_CPT + q) * THREADS + cuda.threadIdx.x)
                if c < n_channels:
                    base = _u32(c * width)
                    for k in range(width):
                        if write_back:
                            window[base + k] = kept[q * width + k]
                        if tracked >= 0:
                            track_conv[layer, entry, base + k] = checkpoint[q * width + k]

    _CONV_TILES[key] = tile
    return tile
