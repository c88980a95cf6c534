"""The converting commits' kernels, specialised per dtype pair and built for bandwidth.

A converting commit (main pool dtype != per-step dtype) moves each committed slot once: read the per-step state, convert
each element, write the main slot (and, for a tracked commit, a prefix-store entry). Rounding is the reference's
([`mamba_cache.precision.reference`][mamba_cache.precision.reference]) bit for bit; what changes here is how the bytes
move.

A slot whose element count is a multiple of 4 is seen as uint64 words (the fast, "wide" path);
each thread owns whole groups of 4 consecutive elements (one Philox4x32-10 call gives a group's 4
random words, exactly the reference's keying: counter word 0 is ``element // 4``):

    element size   words per group   groups per thread   u64 loads in flight per thread
    2 (f16, bf16)        1                  8                         8
    4 (f32)              2                  4 (8: to bf16 or          8 (16)
                                              f16, stochastic)
    8 (f64)              4                  2                         8

    slot [E elements] = [E/4 groups]:
        | g0 g1 .. gT-1 | gT .. g2T-1 | ... (per rounds)  | <- chunk 0 | chunk 1 ...
    thread t of chunk c owns groups  (c * per + i) * threads + t,  i = 0 .. per-1

All of a thread's loads are issued before its first conversion (a local array the compiler keeps
in registers: the loops are unrolled with constant bounds); consecutive threads read consecutive
groups, so a warp's loads cover contiguous 256- or 512-byte spans. The element conversions are
specialised at build time (closure constants, one compiled kernel per dtype pair of the config):

    float32 -> bfloat16   nearest: (x + 0x7FFF + ((x >> 16) & 1)) >> 16, NaN kept a quiet NaN;
                          stochastic: (x + (r >> 16)) >> 16
    bfloat16 -> float32   x << 16 (NaN: quiet bit set)
    float32 -> float16    nearest: the hardware's cvt.rn.f16.f32 (a NaN selected to the reference's);
                          stochastic: x + (r >> 19) on the float32 bits, truncated by the
                          hardware's cvt.rz.f16.f32, for |x| < 2**-126 or 2**-14 <= |x| < 65504;
                          a group holding any other value (a subnormal result, |x| >= 65504, an
                          infinity, a NaN) is flagged and redone after the group loop with the
                          integer steps (one loop over the flagged groups: the group loop stays
                          straight-line code, one block per group, no branch inside)
    float16 -> float32    the hardware's cvt.f32.f16 (exact; a NaN selected to the reference's)
    float16 <-> bfloat16  through float32 (exact), then one rounding as above
    any other pair        the general integer steps (`mamba_cache.precision.kernels.convert_bits`)

Stochastic rounding: the Philox work a thread's groups share (round keys, the two products that
do not depend on the group) is done once per thread (`philox_setup`), leaving 18 products
per group (`philox_group`). A widening pair (2 -> 4 bytes) moves pairs of elements instead
(a uint32 load, a uint64 store: `_widening_chunk`), so a warp's stores are contiguous.

A kind whose slot is not a multiple of 4 elements (its slots are then not 8-byte aligned) takes the
element path (`mamba_cache.precision.kernels._convert_chunk`), in the same launch: each kind
picks its own path. Equal dtypes copy words. The grid is ``(chunks_a + chunks_b, rows, L)``: one
launch covers every layer and both kinds, with no allocation and no synchronisation.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
from numba import cuda

from ..core.launch import slot_launch_shape
from ..core.rows import accepted_steps, is_padding, last_tree_node, row_slot, tracked_step
from . import kernels
from .kernels import (
    MODE_COPY,
    MODE_STOCHASTIC,
)
from .word_conversions import (
    STORE,
    UNPACK,
    bf16_to_f32,
    converter,
    f32_to_bf16_group,
    f32_to_f16_group,
    f32_to_f16_sr_exact,
    philox_group,
    philox_setup,
)

#: uint64 loads each thread issues before converting (the groups per thread follow from it).
WORDS_IN_FLIGHT = 8

#: The (src_e, src_m, dst_e, dst_m) pairs with a specialised conversion; the others (float64 to or
#: from anything) run the general uint64 steps, whose larger code keeps a thread to a quarter of
#: the loads in flight (with more, the compiler stops unrolling and the buffer goes to local memory).
_SPECIALISED = ((8, 23, 8, 7), (8, 7, 8, 23), (8, 23, 5, 10), (5, 10, 8, 23), (5, 10, 8, 7), (8, 7, 5, 10))

#: The stochastic pairs that convert twice the groups per thread (float32 -> bfloat16 / float16).
_DOUBLED = ((8, 23, 8, 7), (8, 23, 5, 10))

_U32 = np.uint64(0xFFFFFFFF)
_U16 = np.uint64(0xFFFF)


def spec_of(mode: int, src_format: tuple, dst_format: tuple, src_size: int, dst_size: int, elems: int) -> tuple:
    """The hashable description of one kind's commit: ``(mode, se, sm, de, dm, src_size, dst_size, wide)``."""
    return (int(mode), *map(int, src_format), *map(int, dst_format), int(src_size), int(dst_size), elems % 4 == 0)


def groups_per_thread(spec: tuple) -> int:
    """Groups of 4 elements one thread converts per chunk (the element path: ``kernels.GROUPS_PER_THREAD``)."""
    if not spec[7]:
        return kernels.GROUPS_PER_THREAD
    words = WORDS_IN_FLIGHT if spec[0] == MODE_COPY or spec[1:5] in _SPECIALISED else WORDS_IN_FLIGHT // 4
    if spec[0] == MODE_STOCHASTIC and spec[1:5] in _DOUBLED:
        # float32 -> bfloat16 / float16 stochastic: twice the groups per thread, so the per-thread
        # setup (row, addresses, Philox keys) is shared by 32 elements
        words *= 2
    return max(1, words // (spec[5] // 2))


def launch_shape(specs: tuple, elems: tuple) -> tuple[tuple[int, ...], int]:
    """``((chunks per kind), threads)``: the x blocks covering one slot of each kind, in one launch."""
    return slot_launch_shape([-(-e // 4) for e in elems], [groups_per_thread(s) for s in specs])


def _wide_chunk(spec: tuple):
    """The device function converting one chunk of one slot seen as uint64 words (see the module docstring)."""
    mode, se, sm, de, dm, src_size, dst_size, _ = spec
    sw, dw = src_size // 2, dst_size // 2  # uint64 words per group of 4 elements
    per = groups_per_thread(spec)
    nbuf = per * sw
    copy = mode == MODE_COPY
    stochastic = mode == MODE_STOCHASTIC
    unpack, store = UNPACK[src_size], STORE[dst_size]
    conv = bf16_to_f32 if copy else converter(mode, se, sm, de, dm)  # unused when copying
    to_bf16 = not copy and (se, sm, de, dm) == (8, 23, 8, 7)
    to_f16 = not copy and (se, sm, de, dm) == (8, 23, 5, 10)
    f16_stochastic = to_f16 and stochastic
    if not copy and src_size == 2 and dst_size == 4:
        return _widening_chunk(spec, conv)

    @cuda.jit(device=True, inline="always")
    def chunk_fn(dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, seed_lo, seed_hi):
        # 32-bit unsigned index arithmetic, as in _widening_chunk
        threads = np.uint32(cuda.blockDim.x)
        d = dst[layer, dst_row]
        s = src[layer, src_row]
        groups = np.uint32(d.shape[0] // dw)
        base = np.uint32(np.uint32(chunk) * np.uint32(threads * per) + np.uint32(cuda.threadIdx.x))
        buf = cuda.local.array(nbuf, np.uint64)
        if stochastic:  # the Philox work every group shares, once per thread
            st = philox_setup(np.uint64(position) & _U32, np.uint64(key_layer) & _U32, kind, seed_lo, seed_hi)
        for i in range(per):  # every load first
            g = np.uint32(base + np.uint32(i) * threads)
            if g < groups:
                for k in range(sw):
                    buf[i * sw + k] = s[g * sw + k]
        redo = np.uint32(0)  # float32 -> float16 stochastic: bit i says group i needs the full steps
        for i in range(per):
            g = np.uint32(base + np.uint32(i) * threads)
            if g < groups:
                if copy:
                    for k in range(sw):
                        d[g * sw + k] = buf[i * sw + k]
                else:
                    r0 = r1 = r2 = r3 = np.uint32(0)
                    if stochastic:
                        r0, r1, r2, r3 = philox_group(g, st)
                    if to_bf16:
                        d[g] = f32_to_bf16_group(buf, i * sw, stochastic, r0, r1, r2, r3)
                    elif to_f16:
                        word, rare = f32_to_f16_group(buf, i * sw, stochastic, r0, r1, r2, r3)
                        d[g] = word
                        redo = np.uint32(redo | (rare << np.uint32(i)))
                    else:
                        e0, e1, e2, e3 = unpack(buf, i * sw)
                        store(d, g, conv(e0, r0), conv(e1, r1), conv(e2, r2), conv(e3, r3))
        if f16_stochastic and redo != np.uint32(0):
            # rare: each flagged group again, from global memory, through the full steps (a loop
            # over the set bits, so its code is there once and the group loop above stays one
            # block of straight-line code)
            while redo != np.uint32(0):
                rest = np.uint32(redo & (redo - np.uint32(1)))
                g = np.uint32(base + np.uint32(31 - cuda.clz(np.uint32(redo ^ rest))) * threads)
                redo = rest
                r0, r1, r2, r3 = philox_group(g, st)
                d[g] = f32_to_f16_sr_exact(s[2 * g], s[2 * g + 1], r0, r1, r2, r3)

    return chunk_fn


def _widening_chunk(spec: tuple, conv):
    """The chunk function of a 2-byte -> 4-byte commit (exact): 32-bit words in, 64-bit words out.

    A thread converts pairs of elements: it loads the uint32 word ``p`` of the source slot (elements
    ``2p, 2p+1``) and stores the uint64 word ``p`` of the target, so consecutive lanes read
    consecutive 4-byte words and write consecutive 8-byte words (each store instruction of a warp
    one contiguous 256-byte span; with groups of 4 a lane wrote two words 16 bytes apart). A chunk
    covers the same elements as `launch_shape` gives it (``2 * per`` pairs per thread):

    ```text
    thread t of chunk c owns pairs  (c * 2 * per + i) * threads + t,  i = 0 .. 2 * per - 1
    ```
    """
    pairs_per_thread = 2 * groups_per_thread(spec)

    @cuda.jit(device=True, inline="always")
    def chunk_fn(dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, seed_lo, seed_hi):
        # 32-bit unsigned index arithmetic (a slot holds far fewer than 2**32 words): one wide
        # multiply-add per address instead of sign-extended 64-bit sums
        threads = np.uint32(cuda.blockDim.x)
        d = dst[layer, dst_row]
        s = src[layer, src_row].view(np.uint32)
        pairs = np.uint32(d.shape[0])
        base = np.uint32(np.uint32(chunk) * np.uint32(threads * pairs_per_thread) + np.uint32(cuda.threadIdx.x))
        buf = cuda.local.array(pairs_per_thread, np.uint32)
        for i in range(pairs_per_thread):  # every load first
            p = np.uint32(base + np.uint32(i) * threads)
            if p < pairs:
                buf[i] = s[p]
        for i in range(pairs_per_thread):
            p = np.uint32(base + np.uint32(i) * threads)
            if p < pairs:
                w = np.uint64(buf[i])
                zero = np.uint32(0)
                d[p] = conv(w & _U16, zero) | (conv(w >> np.uint64(16), zero) << np.uint64(32))

    return chunk_fn


def _element_chunk(spec: tuple):
    """The element-at-a-time chunk function (a slot not a multiple of 4 elements)."""
    mode, se, sm, de, dm = spec[:5]

    @cuda.jit(device=True, inline="always")
    def chunk_fn(dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, seed_lo, seed_hi):
        kernels._convert_chunk(
            dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, mode, se, sm, de, dm, seed_lo, seed_hi
        )

    return chunk_fn


def _chunk(spec: tuple):
    return _wide_chunk(spec) if spec[7] else _element_chunk(spec)


@functools.cache
def commit_kernels(spec_a: tuple, spec_b: tuple) -> SimpleNamespace:
    """The scatter, tree and tracked converting kernels of one pair of kind specs (see `spec_of`).

    Arrays are ``[L, rows, W]`` views of each pool: uint64 words when the kind's slot is a multiple
    of 4 elements, else unsigned integers of the element size (bfloat16 pools are uint16 already):

    ```text
    dst_a / dst_b       [L, B, W]      main pools (written)
    src_a / src_b       [L, B*S, W]    per-step pools; (row b, step t) is row b*V + t
    track_a / track_b   [L, P, W]      prefix-store entries, main dtypes (written; tracked only)
    ```

    ``scatter``: row ``b = blockIdx.y`` with ``a = accept_lengths[b]`` in ``[1, max_accept]`` and
    slot ``s`` (``state_indices[b]`` or ``b``) in ``[0, B)`` gets
    ``dst[l, s] = convert(src[l, b*V + a - 1])``, rounding keyed by position ``positions[b] + a``.
    ``tree``: the last non-negative id ``n`` (at index ``j``) of ``node_ids[b, :min(a, M)]``, if
    ``n < V``: ``dst[l, s] = convert(src[l, b*V + n])``, position ``positions[b] + j + 1``.
    ``tracked``: the scatter, then with ``t = track_steps[b]``, ``e = track_entries[b]``: if
    ``0 <= t < a``, ``t < V``, ``0 <= e < P`` and the slot is not ``pad_slot_id``:
    ``track[l, e] = convert(src[l, b*V + t])``, position ``positions[b] + t + 1``. ``positions`` is read only by
    a stochastic kind (the placeholder otherwise); ``seed_lo`` / ``seed_hi`` are the rounding seed's 32-bit halves.

    Grid ``(chunks_a + chunks_b, rows, L)``, block ``(threads,)`` from `launch_shape`.

    Returns:
        A namespace with ``scatter``, ``tree`` and ``tracked`` (``@cuda.jit`` kernels), built once
        per pair of specs.
    """
    chunk_a, chunk_b = _chunk(spec_a), _chunk(spec_b)

    @cuda.jit(device=True, inline="always")
    def both(dst_a, src_a, dst_b, src_b, chunks_a, dst_row, src_row, position, seed_lo, seed_hi):
        layer = cuda.blockIdx.z
        chunk = cuda.blockIdx.x
        if chunk < chunks_a:
            chunk_a(dst_a, src_a, layer, dst_row, src_row, chunk, layer, 0, position, seed_lo, seed_hi)
        else:
            chunk_b(dst_b, src_b, layer, dst_row, src_row, chunk - chunks_a, layer, 1, position, seed_lo, seed_hi)

    @cuda.jit(cache=False)
    def scatter_convert(
        dst_a,
        src_a,
        dst_b,
        src_b,
        chunks_a,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        max_accept,
        positions,
        seed_lo,
        seed_hi,
    ):
        """``scatter_accepted`` converting to the main pools' dtypes: see `commit_kernels`."""
        row = cuda.blockIdx.y
        accepted = accepted_steps(accept_lengths, row, max_accept)
        slot = row_slot(state_indices, use_indices, row, dst_a.shape[1])
        if accepted == 0 or slot < 0:
            return
        position = np.int64(positions[row]) + accepted
        both(dst_a, src_a, dst_b, src_b, chunks_a, slot, row * seq_len + (accepted - 1), position, seed_lo, seed_hi)

    @cuda.jit(cache=False)
    def scatter_tree_convert(
        dst_a,
        src_a,
        dst_b,
        src_b,
        chunks_a,
        node_ids,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        positions,
        seed_lo,
        seed_hi,
    ):
        """``scatter_tree`` converting to the main pools' dtypes: see `commit_kernels`."""
        row = cuda.blockIdx.y
        node, depth = last_tree_node(node_ids, accept_lengths, row, seq_len)
        slot = row_slot(state_indices, use_indices, row, dst_a.shape[1])
        if node < 0 or slot < 0:
            return
        position = np.int64(positions[row]) + depth + 1
        both(dst_a, src_a, dst_b, src_b, chunks_a, slot, row * seq_len + node, position, seed_lo, seed_hi)

    @cuda.jit(cache=False)
    def scatter_tracked_convert(
        dst_a,
        src_a,
        dst_b,
        src_b,
        chunks_a,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        max_accept,
        positions,
        seed_lo,
        seed_hi,
        track_a,
        track_b,
        track_entries,
        track_steps,
    ):
        """``scatter_tracked`` converting to the main pools' dtypes: see `commit_kernels`."""
        row = cuda.blockIdx.y
        accepted = accept_lengths[row]
        slot = row_slot(state_indices, use_indices, row, dst_a.shape[1])
        if accepted_steps(accept_lengths, row, max_accept) > 0 and slot >= 0:
            position = np.int64(positions[row]) + accepted
            src_row = row * seq_len + (accepted - 1)
            both(dst_a, src_a, dst_b, src_b, chunks_a, slot, src_row, position, seed_lo, seed_hi)
        step, entry = tracked_step(track_steps, track_entries, row, accepted, seq_len, track_a.shape[1])
        if step < 0 or is_padding(state_indices, use_indices, row):
            return
        position = np.int64(positions[row]) + step + 1
        both(track_a, src_a, track_b, src_b, chunks_a, entry, row * seq_len + step, position, seed_lo, seed_hi)

    return SimpleNamespace(scatter=scatter_convert, tree=scatter_tree_convert, tracked=scatter_tracked_convert)
