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
32 registers ([`mamba2_rows`][mamba_cache.replay.tiles.mamba2_rows]: ``rpt`` is `RPT` for float32 elements, `PACKED_RPT`
for a packed 16-bit tile, two elements per register, below). A block owns a
tile of one head ``i``: ``row_groups * rpt`` rows times ``lanes * CPT`` columns
([`mamba2_tiles`][mamba_cache.replay.tiles.mamba2_tiles]; ``lanes`` is the power of two >= ``N / CPT``, at most a warp,
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
([`mamba2_packed`][mamba_cache.replay.tiles.mamba2_packed]) stays packed as it was loaded, two elements per uint32
register: a step unpacks a pair (``cvt.f32.f16`` of each half, or a shift and a mask for bfloat16), computes both
(``FMUL``, ``FFMA``) and rounds them back with one ``cvt.rn.f16x2.f32`` (``cvt.rn.bf16x2.f32``): 3.5 instructions per
element and step, and no conversion before the first step or after the last. Other states are converted to float32 once,
after the loads. Where N is not a multiple of `CPT`, the pool is neither 2- nor 4-byte or does not start on an 8-byte
boundary, the state is read and written one element at a time
([`mamba2_word_elems`][mamba_cache.replay.tiles.mamba2_word_elems]); a thread at the edge of the head repeats its last
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
blocks per SM ([`gdn_launch_bounds`][mamba_cache.replay.tiles.gdn_launch_bounds]). The conv blocks (`_conv_tile`) give a
thread `CONV_CPT` channels and load every value of their new windows before storing any.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.launch import argument_positions
from .kernels import (
    ROUND_STORED,
    THREADS,
    bfloat16_in_hardware,
    launch_args,
    launch_layout,
)
from .tiled_gdn import _make_gdn
from .tiled_mamba2 import _make_mamba2
from .tiles import (
    CONV_CPT,
    CONV_MAX_WIDTH,
    CPT,
    GDN_MIN_BLOCKS,
    MAX_PARTS,
    PACKED_RPT,
    PART,
    RPT,
    WARP,
    _conv_tile,
    conv_chunks,
    gdn_launch_bounds,
    gdn_parts,
    mamba2_packed,
    mamba2_rows,
    mamba2_tiles,
    mamba2_word_elems,
    stash_row_rule,
)

#: What this module shows of its parts (`tiles`: tile sizes, constants, the row rule).
__all__ = [
    "CONV_CPT", "CONV_MAX_WIDTH", "CPT", "GDN_MIN_BLOCKS", "MAX_PARTS", "PACKED_RPT", "PART", "RPT", "THREADS",
    "WARP", "conv_chunks", "gdn_launch_bounds", "gdn_parts", "mamba2_head_blocks", "mamba2_packed", "mamba2_rows",
    "mamba2_tiles", "mamba2_word_elems", "prepare", "replay_gdn_kernel", "replay_mamba2_kernel", "stash_row_rule",
]  # fmt: skip


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
    ``group_heads`` (H / G), so the tile ([`mamba2_tiles`][mamba_cache.replay.tiles.mamba2_tiles]), every row pitch and
    the index divisions are constants, and a thread of a D that is a multiple of its rows
    ([`mamba2_rows`][mamba_cache.replay.tiles.mamba2_rows]) has no edge to test. ``word_elems``
    ([`mamba2_word_elems`][mamba_cache.replay.tiles.mamba2_word_elems]) says
    how the state is accessed: 4 or 2 elements per uint64 word (16-bit: float16, or bfloat16 with ``bits16``; 2:
    float32), 0 one element at a time; with the rounding it says whether the tile is packed
    ([`mamba2_packed`][mamba_cache.replay.tiles.mamba2_packed]). The conv window's width and the conv pool's dtype pick
    the conv part (`_conv_tile`). The kernel's blocks per head are
    [`mamba2_head_blocks`][mamba_cache.replay.tiled.mamba2_head_blocks]. ``ring`` and ``write_back``: see
    [`stash_row_rule`][mamba_cache.replay.tiles.stash_row_rule].
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

    Compile-time: the number of parts ``P`` ([`gdn_parts`][mamba_cache.replay.tiles.gdn_parts]) and, when
    ``D == P * PART``, D itself (no guards in the d loops); any other D up to ``MAX_KEY_DIM`` is guarded against ``dim``
    at run time. The conv window's width and the conv pool's dtype pick the conv part (`_conv_tile`). ``ring`` and
    ``write_back``: see [`stash_row_rule`][mamba_cache.replay.tiles.stash_row_rule].
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
    ``ring``, ``write_back`` ([`stash_row_rule`][mamba_cache.replay.tiles.stash_row_rule]) and ``positions``: an int64
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
