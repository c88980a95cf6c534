"""Tiled replay kernels: the replay commit at memory speed (the ones the Numba backend launches).

Built from the device functions of [`mamba_cache.replay.kernels`][mamba_cache.replay.kernels] (the
rounders, ``mamba2_update``, ``gdn_accumulate`` / ``gdn_write``, the row / slot / tracking rules, and
the conv window update of a window wider than `CONV_MAX_WIDTH`), so each element sees the same
operations in the same order as the decode step; what this module decides is how the work of one
``(layer, row)`` is spread over threads. The tests check it bit for bit against simpler kernels that
give each thread one element (Mamba2) or one whole column (Gated DeltaNet): those were
instruction-bound (five 64-bit divisions and the index math per element) or spilled (a 128-float
column per thread, 255 registers, kilobytes of spill at D = 128).

Pools and stash are seen as in [`mamba_cache.replay.kernels`][mamba_cache.replay.kernels]:

```text
rec     [L, B, H*D*N]      element (i, d, n) at (i * D + d) * N + n
grid  = (chunks_rec + chunks_conv, rows, L),  block = (THREADS,)
```

Mamba2: a thread keeps ``rpt`` consecutive rows x `CPT` consecutive columns of a head in
32 registers ([`mamba2_rows`][mamba_cache.replay.tiled.mamba2_rows]: ``rpt`` is `RPT` for float32 elements, `PACKED_RPT`
for a packed 16-bit tile, two elements per register, below). A block owns a
tile of one head ``i``: ``row_groups * rpt`` rows times ``lanes * CPT`` columns
([`mamba2_tiles`][mamba_cache.replay.tiled.mamba2_tiles]; ``lanes`` is the power of two >= ``N / CPT``, at most a warp,
``row_groups = THREADS / lanes``). Thread ``tx = g * lanes + l`` owns the rows from ``d0`` and
the columns from ``n0``, so a row of its tile is two uint64 words of a 16-bit state (four of a
float32 one), and the two (four) load or store instructions of a row cover ``lanes * CPT``
consecutive elements across the warp:

```text
block x -> (i, d_tile, n_tile)        divisions by constants, once per thread
d0 = d_tile * row_groups * rpt + g * rpt,   n0 = n_tile * lanes * CPT + l * CPT

head i:   n ->  0 .. 7 | 8 .. 15 | ... | 120 .. 127        (N = 128: 16 lanes of CPT = 8, rpt = 8)
d  0..7         t0     | t1      | ... | t15               row group 0
d  8..15        t16    | t17     | ... | t31               row group 1
...
```

The head shape (D, N, H / G) is compile-time ([`replay_mamba2_kernel`][mamba_cache.replay.tiled.replay_mamba2_kernel]),
so row pitches and the index divisions are constants, and where D is a multiple of ``rpt`` a thread has no edge to test.
A thread loads its state words, then step 0's stash (``dA[i]``, its ``u[i, d]`` rows, its ``B[j, n]`` columns: L1 / L2
hits shared by the block's warps), so it waits for memory once; each step loads the next step's stash before it computes
``h = round(fma(u, B, h * dA))`` per element. A 16-bit state that every step rounds to its own format
([`mamba2_packed`][mamba_cache.replay.tiled.mamba2_packed]) stays packed as it was loaded, two elements per uint32
register: a step unpacks a pair (``cvt.f32.f16`` of each half, or a shift and a mask for bfloat16), computes both
(``FMUL``, ``FFMA``) and rounds them back with one ``cvt.rn.f16x2.f32`` (``cvt.rn.bf16x2.f32``): 3.5 instructions per
element and step, and no conversion before the first step or after the last. Other states are converted to float32 once,
after the loads. Where N is not a multiple of `CPT`, the pool is neither 2- nor 4-byte or does not start on an 8-byte
boundary, the state is read and written one element at a time
([`mamba2_word_elems`][mamba_cache.replay.tiled.mamba2_word_elems]); a thread at the edge of the head repeats its last
live row or column in the loads and computes it, but never stores it, so the step loop has no guard. Index arithmetic is
32-bit unsigned. No shared memory, no barrier.

Gated DeltaNet: a column ``S_i[:, e]`` is split over ``P = ceil(D / 32)`` threads (``P`` rounded up to
a power of two), part ``q`` keeping ``d = 32 q .. 32 q + 31`` in registers. The prediction is one
sequential chain ``pred = fma(S[d, e], k[d], pred)``, d = 0 .. D-1 (the decode step's order), so
part ``q`` continues from the value part ``q - 1`` ended with, handed over through shared memory
(one ``syncthreads`` per part and step); the last part's ``pred`` is read back by all parts. A
block's columns belong to one head, so they share one key vector ``k[j, :]`` per step, which the
block keeps in shared memory (two buffers, one per step parity); each thread loads the next
step's share of it, and its ``g[i]``, ``beta[i]``, ``v[i, e]``, while the current step computes:

```text
block: CB = THREADS / P columns x P parts;  tx = q * CB + c   (consecutive threads: consecutive columns)
step:  all:     keys[t % 2] <- prefetched k;  prefetch step t + 1        | sync
       all:     S[d] *= g[i]                        (their 32 d)
       q = 0:   pred = chain(0)            -> shared[0][c]   | sync
       q = 1:   pred = chain(shared[0][c]) -> shared[1][c]   | sync  ... (P parts)
       all:     delta = beta[i] * (v[i, e] - shared[P-1][c]);  S[d] = round(fma(k[d], delta, S[d]))
```

Each part writes its own shared row, and a key buffer is rewritten two steps after it was read, past a barrier every
thread has reached. The chain, not memory, is what a block waits on, so at D = 128 the kernel is built for 8 resident
blocks per SM ([`gdn_launch_bounds`][mamba_cache.replay.tiled.gdn_launch_bounds]). The conv blocks (`_conv_tile`) give a
thread `CONV_CPT` channels and load every value of their new windows before storing any.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, float32
from numba.np import numpy_support

from ..core.device import SIMULATOR, device_pointer
from ..core.launch import argument_positions
from ..precision.kernels import (
    bfloat162_rn_bits,
    float32_bits,
    float32_from_bits,
    half2_rn_bits,
    half_bits_to_float32,
    half_high_float32,
    half_low_float32,
    half_rn_bits,
    load_float32,
)
from .kernels import (
    MAX_KEY_DIM,
    ROUND_BF16,
    ROUND_HALF,
    ROUND_STORED,
    THREADS,
    _position,
    _replay_conv,
    _rounder,
    _row_slot,
    _step,
    _store_word,
    _track,
    _track_conv,
    bfloat16_in_hardware,
    gdn_accumulate,
    gdn_write,
    launch_args,
    launch_layout,
    mamba2_update,
    round_bfloat16,
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
    ([`mamba2_rows`][mamba_cache.replay.tiled.mamba2_rows]); the ``row_groups = THREADS / lanes`` groups of lanes are
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


_MAMBA2_KERNELS: dict = {}
_GDN_KERNELS: dict = {}


def replay_mamba2_kernel(
    rounding: int,
    bits16: int,
    dim: int,
    size: int,
    group_heads: int,
    word_elems: int = 0,
    conv_width: int = 4,
    conv_dtype: Any = np.float16,
    ring: bool = False,
    write_back: bool = True,
) -> Any:
    """The tiled Mamba2 replay kernel for a rounding (``ROUND_*``), a pool kind (``bits16``) and a head shape, cached.

    The head shape is compile-time: head dim ``dim`` (D), state size ``size`` (N) and the heads per group
    ``group_heads`` (H / G), so the tile ([`mamba2_tiles`][mamba_cache.replay.tiled.mamba2_tiles]), every row pitch and
    the index divisions are constants, and a thread of a D that is a multiple of its rows
    ([`mamba2_rows`][mamba_cache.replay.tiled.mamba2_rows]) has no edge to test. ``word_elems``
    ([`mamba2_word_elems`][mamba_cache.replay.tiled.mamba2_word_elems]) says
    how the state is accessed: 4 or 2 elements per uint64 word (16-bit: float16, or bfloat16 with ``bits16``; 2:
    float32), 0 one element at a time; with the rounding it says whether the tile is packed
    ([`mamba2_packed`][mamba_cache.replay.tiled.mamba2_packed]). The conv window's width and the conv pool's dtype pick
    the conv part (`_conv_tile`). The kernel's blocks per head are
    [`mamba2_head_blocks`][mamba_cache.replay.tiled.mamba2_head_blocks]. ``ring`` and ``write_back``: see
    [`stash_row_rule`][mamba_cache.replay.tiled.stash_row_rule].
    """
    key = (rounding, int(bits16), int(dim), int(size), int(group_heads), int(word_elems), int(conv_width),
           np.dtype(conv_dtype).str, bfloat16_in_hardware(), bool(ring), bool(write_back))  # fmt: skip
    kernel = _MAMBA2_KERNELS.get(key)
    if kernel is None:
        conv = _conv_tile(conv_width, conv_dtype, write_back)
        kernel = _MAMBA2_KERNELS[key] = _make_mamba2(*key[:6], conv, stash_row_rule(ring), write_back)
    return kernel


def mamba2_head_blocks(kernel: Any) -> int:
    """Blocks per head of a kernel from `replay_mamba2_kernel`: ``d_tiles * n_tiles`` of its own tile."""
    return kernel.head_blocks


def replay_gdn_kernel(
    key_dim: int,
    rounding: int = ROUND_STORED,
    bits16: int = 0,
    conv_width: int = 4,
    conv_dtype: Any = np.float16,
    ring: bool = False,
    write_back: bool = True,
) -> Any:
    """The tiled Gated DeltaNet replay kernel for key dim D, a rounding and a pool kind, cached.

    Compile-time: the number of parts ``P`` ([`gdn_parts`][mamba_cache.replay.tiled.gdn_parts]) and, when
    ``D == P * PART``, D itself (no guards in the d loops); any other D up to ``MAX_KEY_DIM`` is guarded against ``dim``
    at run time. The conv window's width and the conv pool's dtype pick the conv part (`_conv_tile`). ``ring`` and
    ``write_back``: see [`stash_row_rule`][mamba_cache.replay.tiled.stash_row_rule].
    """
    parts = gdn_parts(key_dim)
    exact = key_dim if key_dim == parts * PART else 0
    key = (parts, exact, rounding, int(bits16), int(conv_width), np.dtype(conv_dtype).str, bfloat16_in_hardware(),
           bool(ring), bool(write_back))  # fmt: skip
    kernel = _GDN_KERNELS.get(key)
    if kernel is None:
        conv = _conv_tile(conv_width, conv_dtype, write_back)
        kernel = _GDN_KERNELS[key] = _make_gdn(*key[:4], conv, stash_row_rule(ring), write_back)
    return kernel


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


def _make_mamba2(
    rounding: int,
    pool_bits16: int,
    head_dim: int,
    state_size: int,
    group_heads: int,
    word_elems: int,
    conv_tile: Any,
    stash_row: Any = _stash_row_of_row,
    write_back: bool = True,
) -> Any:
    rounder = _rounder(rounding)
    packed = mamba2_packed(rounding, pool_bits16, word_elems)
    rpt = mamba2_rows(packed)
    cells = rpt * CPT
    lanes, row_groups, d_tiles, n_tiles = mamba2_tiles(head_dim, state_size, rpt)
    tile_rows, tile_cols = row_groups * rpt, lanes * CPT
    per_head = d_tiles * n_tiles
    rows_exact = head_dim % rpt == 0  # every live thread has all its rows live
    word_pitch = state_size // word_elems if word_elems else 0  # uint64 words per state row
    words = CPT // word_elems if word_elems else 1  # uint64 words of a thread's row
    elem_bits = 64 // word_elems if word_elems else 64
    elem_mask = (1 << elem_bits) - 1
    word_cells, elem_cells = rpt * words, (1 if word_elems else cells)  # the raw loads' buffers
    pairs = CPT // 2  # uint32 pairs of a packed tile row
    pairs_in_hardware = bfloat16_in_hardware()  # cvt.rn.f16x2.f32 and cvt.rn.bf16x2.f32: sm_80 and up too
    tile_cells, tile_type = (rpt * pairs, np.uint32) if packed else (cells, float32)

    @cuda.jit(device=True, inline=True)
    def low_of(w):
        """The float32 of the element in bits 0-15 of a packed pair (exact)."""
        if pool_bits16:
            return float32_from_bits(w << np.uint32(16))
        return half_low_float32(w)

    @cuda.jit(device=True, inline=True)
    def high_of(w):
        """The float32 of the element in bits 16-31 of a packed pair (exact)."""
        if pool_bits16:
            return float32_from_bits(w & np.uint32(0xFFFF0000))
        return half_high_float32(w)

    @cuda.jit(device=True, inline=True)
    def round_pair(low, high):
        """Two step results rounded to the pool's format, packed (``low`` in bits 0-15).

        The bits of the rounder of each. On an sm_80+ GPU one ``cvt.rn.f16x2.f32`` /
        ``cvt.rn.bf16x2.f32``; the bfloat16 one without the rounder's NaN select, because a value
        rounded here is an ``FFMA``'s result, and the GPU's arithmetic returns the canonical NaN
        ``0x7FFFFFFF``, which both round to ``0x7FFF`` (``tests/test_replay.py`` pins it on the GPU).
        Elsewhere (an older GPU, the simulator) the one-value rounding of each.
        """
        if pairs_in_hardware:
            return bfloat162_rn_bits(low, high) if pool_bits16 else half2_rn_bits(low, high)
        if pool_bits16:
            return (float32_bits(round_bfloat16(low)) >> np.uint32(16)) | (
                float32_bits(round_bfloat16(high)) & np.uint32(0xFFFF0000)
            )
        return half_rn_bits(low) | (half_rn_bits(high) << np.uint32(16))

    @cuda.jit(device=True, inline=True)
    def element_of(h, c):
        """Element ``c`` (``r * CPT + k``) of the thread's tile, as float32."""
        if packed:
            w = h[c // 2]
            return high_of(w) if c % 2 else low_of(w)
        return h[c]

    @cuda.jit(device=True, inline=True)
    def unpack(w, e):
        """Element ``e`` of the pool's uint64 word ``w``, as float32 (exact)."""
        x = np.uint32((w >> np.uint64(e * elem_bits)) & np.uint64(elem_mask))
        if word_elems == 2:
            return float32_from_bits(x)
        if pool_bits16:
            return float32_from_bits(x << np.uint32(16))
        return half_bits_to_float32(x)

    @cuda.jit(device=True, inline=True)
    def bits_of(h):
        """The pool element's bits of a state value already rounded to the pool's format, as uint64."""
        if word_elems == 2:
            return np.uint64(float32_bits(h))
        if pool_bits16:
            return np.uint64(float32_bits(h) >> np.uint32(16))
        return np.uint64(half_rn_bits(h))  # exact: h is a float16 value

    @cuda.jit(device=True, inline=True)
    def fetch(u_next, b_next, t, row, i, j, d0, n0, last_row, last_col, heads, groups, seq_len, decays, inputs,
              projections, node_ids, use_nodes):  # fmt: skip
        """Step ``t``'s stash for this thread, returning ``dA[i]``.

        ``u[i, d]`` of its rows go into ``u_next``, ``B[j, n]`` of its columns into ``b_next``; a
        row or column past the edge gets the last live one's (it is computed, never stored).
        """
        step = _u32(_step(node_ids, use_nodes, row, seq_len, t))
        head = _u32(step * heads + i)
        u_first = np.uint64(_u32(head * head_dim + d0))
        b_first = np.uint64(_u32(_u32(step * groups + j) * state_size + n0))
        for r in range(rpt):
            u_next[r] = inputs[u_first + np.uint64(min(r, last_row))]
        for k in range(CPT):
            b_next[k] = projections[b_first + np.uint64(min(k, last_col))]
        return decays[head]

    @cuda.jit(device=True, **_FORCE_INLINE)
    def replay_steps(
        h, u_next, b_next, decay_next, start, stop, accepted, row, layer, i, j, d0, n0, first, last_row, last_col,
        heads, groups, seq_len, decays, inputs, projections, node_ids, use_nodes, positions, use_positions, mode,
        exp_bits, man_bits, half, seed_lo, seed_hi,
    ):  # fmt: skip
        """Steps ``start .. stop-1`` on the thread's tile ``h`` (``rpt x CPT``, row-major), in place.

        ``h`` holds packed pairs ([`mamba2_packed`][mamba_cache.replay.tiled.mamba2_packed]) or float32 elements.

        On entry ``u_next``, ``b_next``, ``decay_next`` hold step ``start``'s stash; each step
        loads the next one's before it computes. Every element of the tile is computed (no guard in
        the loop: past the edge the tile repeats its last live row or column, which is never
        stored). Returns the next step's ``dA[i]``.
        """
        u_now = cuda.local.array(rpt, float32)
        b_now = cuda.local.array(CPT, float32)
        for t in range(start, stop):
            decay = decay_next
            for r in range(rpt):
                u_now[r] = u_next[r]
            for k in range(CPT):
                b_now[k] = b_next[k]
            if t + 1 < accepted:
                decay_next = fetch(u_next, b_next, t + 1, row, i, j, d0, n0, last_row, last_col, heads, groups,
                                   seq_len, decays, inputs, projections, node_ids, use_nodes)  # fmt: skip
            if packed:
                for r in range(rpt):
                    for p in range(pairs):
                        w = h[r * pairs + p]
                        h[r * pairs + p] = round_pair(
                            mamba2_update(low_of(w), decay, u_now[r], b_now[2 * p]),
                            mamba2_update(high_of(w), decay, u_now[r], b_now[2 * p + 1]),
                        )
                continue
            position = _position(positions, use_positions, row, t)
            for r in range(rpt):
                for k in range(CPT):
                    h[r * CPT + k] = rounder(
                        mamba2_update(h[r * CPT + k], decay, u_now[r], b_now[k]),
                        mode,
                        exp_bits,
                        man_bits,
                        half,
                        _u32(first + r * state_size + k),
                        position,
                        layer,
                        seed_lo,
                        seed_hi,
                    )
        return decay_next

    @cuda.jit(cache=False)
    def replay_mamba2_tiled(
        rec,
        conv,
        dA,  # noqa: N803
        u,
        B,  # noqa: N803
        col,
        chunks_rec,
        heads,
        dim,
        size,
        groups,
        channels,
        width,
        mode,
        exp_bits,
        man_bits,
        bits16,
        half,
        seed_lo,
        seed_hi,
        positions,
        use_positions,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        node_ids,
        use_nodes,
        track_rec,
        track_conv,
        track_entries,
        track_steps,
        use_tracking,
        rec_words,
    ):
        """Replay the accepted Mamba2 steps of each row into its slot, every layer, both state kinds.

        Arguments as `launch_args` lays them out (``dim`` and ``size`` go
        unread: the kernel's head shape is compile-time), with ``chunks_rec = H *``
        [`mamba2_head_blocks`][mamba_cache.replay.tiled.mamba2_head_blocks] (its
        [`mamba2_tiles`][mamba_cache.replay.tiled.mamba2_tiles]) and ``rec_words``, the recurrent pool seen as uint64
        words ``[L, B, H*D*N / word_elems]`` (with ``word_elems`` 0: ``rec`` again, unused). Thread layout in the module
        docstring. Index arithmetic is 32-bit unsigned (a slot holds fewer than 2**32 elements; ``prepare`` checks).

        Grid ``(chunks_rec + conv_chunks(C, K), rows, L)``, block ``(THREADS,)``.
        """
        layer, grid_row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], grid_row, node_ids, use_nodes
        )
        if slot < 0:
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, grid_row, accepted, track_rec.shape[1])
        row = stash_row(grid_row, slot)  # the stash row (and positions entry) this row reads
        block = cuda.blockIdx.x
        if block >= chunks_rec:
            conv_tile(conv, col, track_conv, entry, tracked, layer, slot, row, seq_len, accepted, block - chunks_rec,
                      channels, width, node_ids, use_nodes)  # fmt: skip
            return
        n_heads, n_groups = _u32(heads), _u32(groups)
        tx = _u32(cuda.threadIdx.x)
        i = _u32(_u32(block) // per_head)  # divisions by constants: multiply and shift
        rest = _u32(_u32(block) - i * per_head)
        d_tile = _u32(rest // n_tiles)
        n_tile = _u32(rest - d_tile * n_tiles)
        group = _u32(tx // lanes)
        d0 = _u32(_u32(d_tile * tile_rows) + group * rpt)
        n0 = _u32(_u32(n_tile * tile_cols) + _u32(tx - group * lanes) * CPT)
        if d0 >= head_dim or n0 >= state_size:  # past the head's edge (no barrier in this kernel)
            return
        # live rows r < rows, live columns k < cols; loads past the edge repeat the last live ones
        rows = _u32(rpt) if rows_exact else min(_u32(rpt), _u32(head_dim - d0))
        cols = _u32(CPT) if word_elems else min(_u32(CPT), _u32(state_size - n0))  # words: N is a multiple of CPT
        last_row, last_col = _u32(rows - 1), _u32(cols - 1)
        j = _u32(i // group_heads)
        first = _u32(_u32(i * head_dim + d0) * state_size + n0)  # element (i, d0, n0); (r, k) is first + r * N + k
        decays, inputs, projections = dA[layer], u[layer], B[layer]
        state = rec[layer, slot]
        # every load first: the state's raw words, then step 0's stash, so the thread waits for memory
        # once; the conversions after both
        raw_words = cuda.local.array(word_cells, np.uint64)
        raw = cuda.local.array(elem_cells, rec.dtype)  # the pool's own element type (uint16 for bfloat16)
        state_words = rec_words[layer, slot]
        if word_elems:
            for r in range(rpt):
                for w in range(words):
                    raw_words[r * words + w] = state_words[_at(first // word_elems, min(r, last_row), word_pitch, w)]
        else:
            for r in range(rpt):
                for k in range(CPT):
                    raw[r * CPT + k] = state[_at(first, min(r, last_row), state_size, min(k, last_col))]
        u_next = cuda.local.array(rpt, float32)
        b_next = cuda.local.array(CPT, float32)
        decay_next = fetch(u_next, b_next, 0, row, i, j, d0, n0, last_row, last_col, n_heads, n_groups, seq_len,
                           decays, inputs, projections, node_ids, use_nodes)  # fmt: skip
        h = cuda.local.array(tile_cells, tile_type)
        if packed:  # the words as they are: a row's CPT / 2 pairs are the halves of its uint64 words
            for c in range(rpt * words):
                h[2 * c] = np.uint32(raw_words[c] & np.uint64(0xFFFFFFFF))
                h[2 * c + 1] = np.uint32(raw_words[c] >> np.uint64(32))
        else:
            for r in range(rpt):
                for k in range(CPT):
                    if word_elems:
                        h[r * CPT + k] = unpack(raw_words[r * words + k // word_elems], k % word_elems)
                    else:
                        h[r * CPT + k] = load_float32(raw[r * CPT + k], pool_bits16)
        # the state after step `tracked` is stored between two step loops, not inside one (a store
        # inside the loop keeps its addresses live in registers for the whole replay)
        split = tracked + 1 if tracked >= 0 else 0
        decay_next = replay_steps(h, u_next, b_next, decay_next, 0, split, accepted, row, layer, i, j, d0, n0, first,
                                  last_row, last_col, n_heads, n_groups, seq_len, decays, inputs, projections,
                                  node_ids, use_nodes, positions, use_positions, mode, exp_bits, man_bits, half,
                                  seed_lo, seed_hi)  # fmt: skip
        if tracked >= 0:  # rare (a prefix-store checkpoint): element stores into the entry
            track = track_rec[layer, entry]
            for r in range(rpt):
                for k in range(CPT):
                    if r < rows and k < cols:
                        track[_at(first, r, state_size, k)] = _store_word(element_of(h, r * CPT + k), pool_bits16)
        replay_steps(h, u_next, b_next, decay_next, split, accepted, accepted, row, layer, i, j, d0, n0, first,
                     last_row, last_col, n_heads, n_groups, seq_len, decays, inputs, projections, node_ids,
                     use_nodes, positions, use_positions, mode, exp_bits, man_bits, half, seed_lo, seed_hi)  # fmt: skip
        if not write_back:
            return
        if packed:
            for r in range(rpt):
                if r < rows:
                    for w in range(words):
                        c = r * words + w
                        word = np.uint64(h[2 * c]) | (np.uint64(h[2 * c + 1]) << np.uint64(32))
                        state_words[_at(first // word_elems, r, word_pitch, w)] = word
        elif word_elems:
            for r in range(rpt):
                if r < rows:
                    for w in range(words):
                        word = np.uint64(0)
                        for e in range(word_elems):
                            word |= bits_of(h[r * CPT + w * word_elems + e]) << np.uint64(e * elem_bits)
                        state_words[_at(first // word_elems, r, word_pitch, w)] = word
        else:
            for r in range(rpt):
                for k in range(CPT):
                    if r < rows and k < cols:
                        state[_at(first, r, state_size, k)] = _store_word(h[r * CPT + k], pool_bits16)

    replay_mamba2_tiled.head_blocks = per_head  # the grid's blocks per head, for prepare (mamba2_head_blocks)
    return replay_mamba2_tiled


def _make_gdn(
    parts: int,
    exact: int,
    rounding: int,
    pool_bits16: int,
    conv_tile: Any,
    stash_row: Any = _stash_row_of_row,
    write_back: bool = True,
) -> Any:
    rounder = _rounder(rounding)
    columns_per_block = THREADS // parts
    key_span = exact if exact else MAX_KEY_DIM  # shared key buffer: one step's k[j, :]
    keys_per_thread = -(-key_span // THREADS)
    scalars = keys_per_thread  # the prefetch buffer: a thread's keys, then g[i], beta[i], v[i, e]
    ahead_size = keys_per_thread + 3
    bounds = gdn_launch_bounds(exact, rounding)
    kernel_options = {"launch_bounds": bounds} if bounds and not SIMULATOR else {}  # the simulator takes none

    @cuda.jit(device=True, inline=True)
    def key_dim_of(dim):
        return exact if exact else dim

    @cuda.jit(device=True, inline=True)
    def inside(d, dim):  # d < D; always so when D is exactly the parts' span (the guard compiles away)
        return True if exact else d < dim

    @cuda.jit(device=True, inline=True)
    def prefetch(ahead, t, row, i, j, e, live, n_dim, heads, size, groups, seq_len, decays, strengths, keys, values,
                 node_ids, use_nodes):  # fmt: skip
        """Load step ``t``'s stash into ``ahead``: the thread's keys, ``g[i]``, ``beta[i]``, ``v[i, e]``."""
        step = _u32(_step(node_ids, use_nodes, row, seq_len, t))
        key_row = _u32(_u32(step * groups + j) * n_dim)
        tx = _u32(cuda.threadIdx.x)
        for q in range(keys_per_thread):
            if tx + q * THREADS < n_dim:
                ahead[q] = keys[_u32(key_row + tx + q * THREADS)]
        head = _u32(step * heads + i)
        ahead[scalars] = decays[head]
        ahead[scalars + 1] = strengths[head]
        ahead[scalars + 2] = values[_u32(head * size + e)] if live else float32(0.0)

    @cuda.jit(device=True, **_FORCE_INLINE)
    def step_column(
        s, handover, shared_keys, ahead, t, accepted, part, local, d_first, n_dim, i, j, e, live, first, row, layer,
        heads, size, groups, seq_len, decays, strengths, keys, values, node_ids, use_nodes, positions, use_positions,
        mode, exp_bits, man_bits, half, seed_lo, seed_hi,
    ):  # fmt: skip
        """Replayed step ``t`` of this thread's part ``s`` of column ``e``: every thread of the block calls it.

        On entry ``ahead`` holds step ``t``'s stash (`prefetch`); the keys go to shared buffer
        ``t % 2``, the next step's stash is loaded while this one computes.
        """
        buf = t & 1
        tx = _u32(cuda.threadIdx.x)
        for q in range(keys_per_thread):
            if tx + q * THREADS < n_dim:
                shared_keys[buf, tx + q * THREADS] = ahead[q]
        decay, strength, value = ahead[scalars], ahead[scalars + 1], ahead[scalars + 2]
        if t + 1 < accepted:
            prefetch(ahead, t + 1, row, i, j, e, live, n_dim, heads, size, groups, seq_len, decays, strengths, keys,
                     values, node_ids, use_nodes)  # fmt: skip
        cuda.syncthreads()  # the keys are in; buffer t % 2 was last read in step t - 2, before the previous barrier
        for d in range(PART):
            if inside(d_first + d, n_dim):
                s[d] = s[d] * decay
        for q in range(parts):  # the prediction: one chain over d = 0 .. D-1, part after part
            if part == q:
                pred = float32(0.0) if q == 0 else handover[q - 1, local]
                for d in range(PART):
                    if inside(d_first + d, n_dim):
                        pred = gdn_accumulate(pred, s[d], shared_keys[buf, d_first + d])
                handover[q, local] = pred
            cuda.syncthreads()
        delta = strength * (value - handover[parts - 1, local])
        position = _position(positions, use_positions, row, t)
        for d in range(PART):
            if inside(d_first + d, n_dim):
                s[d] = rounder(
                    gdn_write(s[d], shared_keys[buf, d_first + d], delta),
                    mode,
                    exp_bits,
                    man_bits,
                    half,
                    _u32(first + d * size),
                    position,
                    layer,
                    seed_lo,
                    seed_hi,
                )

    @cuda.jit(cache=False, **kernel_options)
    def replay_gdn_tiled(
        rec,
        conv,
        g,
        beta,
        k,
        v,
        col,
        chunks_rec,
        heads,
        dim,
        size,
        groups,
        channels,
        width,
        mode,
        exp_bits,
        man_bits,
        bits16,
        half,
        seed_lo,
        seed_hi,
        positions,
        use_positions,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        node_ids,
        use_nodes,
        track_rec,
        track_conv,
        track_entries,
        track_steps,
        use_tracking,
    ):
        """Replay the accepted Gated DeltaNet steps of each row into its slot, every layer, both state kinds.

        Arguments as `launch_args` lays them out, with ``chunks_rec = H *
        ceil(N / (THREADS / P))`` (a block's columns are of one head). Thread layout, the hand-over of
        the prediction and the shared keys in the module docstring; per element the operations and
        their order are [`mamba_cache.replay.kernels.gdn_column_step`][mamba_cache.replay.kernels.gdn_column_step]'s.

        Grid ``(chunks_rec + conv_chunks(C, K), rows, L)``, block ``(THREADS,)``.
        """
        handover = cuda.shared.array((parts, columns_per_block), float32)
        shared_keys = cuda.shared.array((2, key_span), float32)
        layer, grid_row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], grid_row, node_ids, use_nodes
        )
        if slot < 0:  # block-uniform: no thread of the block reaches a barrier
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, grid_row, accepted, track_rec.shape[1])
        row = stash_row(grid_row, slot)  # the stash row (and positions entry) this row reads
        block = cuda.blockIdx.x
        if block >= chunks_rec:  # block-uniform as well
            conv_tile(conv, col, track_conv, entry, tracked, layer, slot, row, seq_len, accepted, block - chunks_rec,
                      channels, width, node_ids, use_nodes)  # fmt: skip
            return
        n_dim = _u32(key_dim_of(dim))
        n_heads, n_size, n_groups = _u32(heads), _u32(size), _u32(groups)
        tx = _u32(cuda.threadIdx.x)
        part = _u32(tx // columns_per_block)
        local = _u32(tx - part * columns_per_block)
        tiles = _u32(_u32(n_size + (columns_per_block - 1)) // columns_per_block)  # column tiles per head
        i = _u32(_u32(block) // tiles)
        e = _u32(_u32(block - i * tiles) * columns_per_block + local)
        live = e < n_size  # a thread past the head's last column still loads keys and takes every barrier
        if not live:
            e = _u32(0)
        j = _u32(i // _u32(n_heads // n_groups))
        d_first = _u32(part * PART)
        first = _u32(_u32(i * n_dim + d_first) * n_size + e)  # (i, d_first, e); (i, d_first + d, e) is + d * N
        # the thread's d-range of column e, as strided views: element d of it is (i, d_first + d, e)
        state = rec[layer, slot, first::size]
        track = track_rec[layer, entry if entry >= 0 else 0, first::size]
        decays, strengths, keys, values = g[layer], beta[layer], k[layer], v[layer]
        s = cuda.local.array(PART, float32)
        for d in range(PART):
            s[d] = float32(0.0)
            if live and inside(d_first + d, n_dim):
                s[d] = load_float32(state[d], pool_bits16)
        ahead = cuda.local.array(ahead_size, float32)
        prefetch(ahead, 0, row, i, j, e, live, n_dim, n_heads, n_size, n_groups, seq_len, decays, strengths, keys,
                 values, node_ids, use_nodes)  # fmt: skip
        # the state after step `tracked` is stored between two step loops, not inside one: a store in the
        # loop keeps its 32 loop-invariant addresses live in registers for the whole replay
        split = tracked + 1 if tracked >= 0 else 0
        for t in range(split):
            step_column(s, handover, shared_keys, ahead, t, accepted, part, local, d_first, n_dim, i, j, e, live, first,
                        row, layer, n_heads, n_size, n_groups, seq_len, decays, strengths, keys, values, node_ids,
                        use_nodes, positions, use_positions, mode, exp_bits, man_bits, half, seed_lo,
                      seed_hi)  # fmt: skip
        if tracked >= 0 and live:
            for d in range(PART):
                if inside(d_first + d, n_dim):
                    track[d] = _store_word(s[d], pool_bits16)
        for t in range(split, accepted):
            step_column(s, handover, shared_keys, ahead, t, accepted, part, local, d_first, n_dim, i, j, e, live, first,
                        row, layer, n_heads, n_size, n_groups, seq_len, decays, strengths, keys, values, node_ids,
                        use_nodes, positions, use_positions, mode, exp_bits, man_bits, half, seed_lo,
                      seed_hi)  # fmt: skip
        if live and write_back:
            for d in range(PART):
                if inside(d_first + d, n_dim):
                    state[d] = _store_word(s[d], pool_bits16)

    return replay_gdn_tiled


def prepare(
    pools: Any,
    stash: dict,
    config: Any,
    placeholder: Any,
    launch_class: type,
    *,
    ring: bool = False,
    write_back: bool = True,
    positions: Any = None,
) -> tuple:
    """(launch, x blocks, layers) of the tiled replay kernel of ``config.mixer`` over a manager's pools.

    The launch starts with no positions, indices, nodes or tracking bound (the ``use_*`` flags 0); each
    call re-points the ones it uses (``launch_class``: ``PreparedLaunch`` on a GPU, ``DispatcherLaunch``
    under the simulator; ``placeholder``: an int32 ``[B]`` device array bound to the index arguments).

    The launch arguments are [`mamba_cache.replay.kernels.launch_args`][mamba_cache.replay.kernels.launch_args] (the
    backend re-points the same ones per call), the Mamba2 kernel's ``rec_words`` appended (the pool's uint64 view, or
    the pool again when it is read one element at a time). Checkpoint mode's folds pass ``stash`` = the history ring,
    ``ring``, ``write_back`` ([`stash_row_rule`][mamba_cache.replay.tiled.stash_row_rule]) and ``positions``: an int64
    ``[B]`` device array bound (``use_positions`` 1) in place of the int32 placeholder (the kernel is compiled for it).
    """
    lay = launch_layout(pools, config)
    heads, dim, size = config.recurrent_state_num_heads, config.recurrent_state_head_dim, config.recurrent_state_size
    extra: tuple = ()
    if config.mixer == "mamba2":
        words = mamba2_word_elems(lay.rec, size)
        kernel = replay_mamba2_kernel(lay.rounding, lay.bits16, dim, size, heads // config.n_groups, words,
                                      config.conv_kernel, lay.conv.dtype, ring, write_back)  # fmt: skip
        chunks_rec = heads * mamba2_head_blocks(kernel)  # the kernel's own tile decides
        extra = (lay.rec.view(np.uint64) if words else lay.rec,)
    else:
        kernel = replay_gdn_kernel(dim, lay.rounding, lay.bits16, config.conv_kernel, lay.conv.dtype, ring, write_back)
        chunks_rec = heads * -(-size // (THREADS // gdn_parts(dim)))
    chunks_conv = conv_chunks(config.conv_dim, config.conv_kernel)
    widest = max(lay.rec.shape[2], *(stash[name].shape[1] for name in lay.fields))
    if widest >= 2**32:  # the kernels index a slot and a layer's stash field with 32-bit arithmetic
        raise ValueError(f"replay commit: a slot or a layer's stash field holds {widest} elements, at most 2**32 - 1")
    args = [*launch_args(lay, stash, config, chunks_rec, placeholder), *extra]
    if positions is not None:
        names = argument_positions(kernel)
        args[names["positions"]], args[names["use_positions"]] = positions, 1
    return launch_class(kernel, tuple(args), THREADS), chunks_rec + chunks_conv, lay.layers
