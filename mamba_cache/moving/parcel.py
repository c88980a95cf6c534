"""State parcels: the layout, the descriptor and the checks of a state moved between caches (backend-neutral).

A parcel carries the current state of ``n`` slots, every layer and both state kinds, from one
tensor-parallel rank (the source, rank ``i`` of ``Ts``) to the ranks of another cache (rank ``j``
of ``Td``), which may split the model's heads another way. It is one PIECE per destination rank
whose heads overlap the source's: a contiguous byte buffer and its descriptor.

A piece's buffer is a sequence of PARTS, each the overlap of what the source holds and what the
destination holds of one split dimension of the model, as ``[n, L, units, unit_elems]`` in the
state's dtype, starting at a 16-byte-aligned offset:

```text
part        units (split with)            unit_elems   dtype
recurrent   heads   [lo, hi) of H         D * N        recurrent
x / q / ..  conv channels [lo, hi) of the K            conv
            section (heads or groups)

buffer:  | recurrent [n, L, heads, D*N] |pad| section 0 [n, L, ch, K] |pad| section 1 ... |
```

A section whose groups every rank keeps whole (``Config.replicated_groups``) is carried whole in
every piece (and a piece exists only where the two ranks share heads). The descriptor
(`ParcelDescriptor`) names the model (a fingerprint of its fields only, never of B, S, the commit
mode or the shard), the namespace, the source and destination ranks, per slot the token position
and prefix key when known, the parts, and per 1 MiB chunk of the buffer an Adler-32 checksum
(`adler32_chunks`, the NumPy twin of the device kernel), with a blake2b-16 digest of the
checksums. Everything here is host arithmetic on small tables; the backends copy and sum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, NamedTuple

import numpy as np

from .._config import Config

__all__ = [
    "CHUNK_BYTES",
    "ParcelDescriptor",
    "ParcelError",
    "Part",
    "StateParcel",
    "adler32_chunks",
    "fingerprint",
    "layout",
]

#: Bytes per checksummed chunk of a buffer (the last chunk may be shorter).
CHUNK_BYTES = 1 << 20
#: Adler-32's modulus (the largest prime below 2**16).
ADLER_MOD = 65521
#: Parts start at multiples of this many bytes (every state dtype's itemsize divides it).
ALIGN = 16
#: The descriptor format.
VERSION = 1


class ParcelError(ValueError):
    """A parcel cannot be imported here (another model, namespace, dtype, shard, or damaged bytes).

    Raised before any byte of a slot is written: the message names what differs.
    """


class Part(NamedTuple):
    """One part of a piece's buffer: ``[n, L, hi - lo, unit_elems]`` of ``dtype`` at byte ``offset``.

    ``name`` is ``"recurrent"`` (units: the model's heads) or a conv section's name (units: the
    section's channels in the whole model); ``[lo, hi)`` are model units.
    """

    name: str
    lo: int
    hi: int
    unit_elems: int
    dtype: str
    offset: int


@dataclasses.dataclass(frozen=True)
class ParcelDescriptor:
    """What a piece's buffer holds, and how to check it (JSON-serialisable: ``to_json`` / ``from_json``).

    Attributes:
        version: the descriptor format (1).
        fingerprint: blake2b-16 hex of the model fields (`fingerprint`).
        namespace: the exporter's namespace (model / adapter); an import must name the same.
        recurrent_dtype: the recurrent state's dtype name.
        conv_dtype: the conv state's dtype name.
        source_rank: the exporting rank ``i``.
        source_size: the exporter's TP size ``Ts``.
        dest_rank: the rank ``j`` this piece is for.
        dest_size: the destination TP size ``Td``.
        count: ``n``, the rows of the buffer.
        pad_rows: the rows the exporter read nothing into (``pad_slot_id``): zeros, never imported.
        positions: per slot, the tokens its state has consumed, or ``None``.
        keys: per slot, the prefix key (hex of the store's 16-byte digest) or ``None``; ``None`` for none.
        parts: the buffer's parts (`Part`), in order.
        nbytes: the buffer's length in bytes.
        chunk_bytes: bytes per checksummed chunk.
        checksums: Adler-32 of each chunk of the buffer.
        digest: blake2b-16 hex of ``checksums`` (little-endian uint32).
    """

    version: int
    fingerprint: str
    namespace: str
    recurrent_dtype: str
    conv_dtype: str
    source_rank: int
    source_size: int
    dest_rank: int
    dest_size: int
    count: int
    pad_rows: tuple
    positions: tuple | None
    keys: tuple | None
    parts: tuple
    nbytes: int
    chunk_bytes: int
    checksums: tuple
    digest: str

    def to_json(self) -> bytes:
        """The descriptor as UTF-8 JSON (what a transport sends ahead of the buffer)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ParcelDescriptor:
        """Parse `to_json`'s bytes.

        Raises:
            ParcelError: not a descriptor of this format.
        """
        try:
            fields = json.loads(bytes(data).decode())
            fields["parts"] = tuple(Part(*p) for p in fields["parts"])
            for name in ("positions", "keys", "checksums", "pad_rows"):
                if fields[name] is not None:
                    fields[name] = tuple(fields[name])
            descriptor = cls(**fields)
        except (ValueError, TypeError, KeyError) as error:
            raise ParcelError(f"parcel descriptor: not a state parcel descriptor ({error})") from None
        return descriptor


@dataclasses.dataclass(frozen=True)
class StateParcel:
    """The states of some slots on their way to another cache: one piece per overlapping destination rank.

    A piece is a ``(descriptor, buffer)`` pair, for each destination rank whose heads overlap the source's.

    Attributes:
        pieces: ``(ParcelDescriptor, buffer)`` pairs; a buffer is a 1-D uint8 array of
            ``descriptor.nbytes`` bytes (a host ``numpy.ndarray`` from the NumPy backend, a device
            array from the Numba backend; an import also takes host bytes or a torch tensor).
    """

    pieces: tuple

    def piece(self, dest_rank: int) -> tuple:
        """The ``(descriptor, buffer)`` for destination rank ``dest_rank``.

        Raises:
            ParcelError: the parcel has no piece for that rank.
        """
        for descriptor, buffer in self.pieces:
            if descriptor.dest_rank == dest_rank:
                return descriptor, buffer
        ranks = [d.dest_rank for d, _ in self.pieces]
        raise ParcelError(f"the parcel has no piece for destination rank {dest_rank} (it has ranks {ranks})")

    def for_rank(self, dest_rank: int) -> StateParcel:
        """The parcel of one destination rank (what to send to it)."""
        return StateParcel((self.piece(dest_rank),))

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers together."""
        return sum(d.nbytes for d, _ in self.pieces)


# ---------------------------------------------------------------- the model and its split dimensions
def _dims(config: Config) -> list:
    """``(name, split, total units, units held here, first unit here, unit elems, dtype)`` per split dimension.

    The recurrent state splits by heads; the conv state by its sections (``Config.conv_sections``),
    or, for a conv dimension that follows no mixer layout, as one block that only an equal shard holds.
    """
    heads = config.recurrent_state_num_heads
    dims = [
        (
            "recurrent",
            "heads",
            config.unsharded_num_heads,
            heads,
            config.head_range[0],
            config.recurrent_state_head_dim * config.recurrent_state_size,
            config.recurrent_state_dtype.name,
        )
    ]
    sections = config.conv_sections
    if sections is None:
        dims.append(
            ("conv", "shard", config.conv_dim, config.conv_dim, 0, config.conv_kernel, config.conv_state_dtype.name)
        )
    else:
        for s in sections:
            dims.append(
                (s.name, s.split, s.total, s.channels, s.start, config.conv_kernel, config.conv_state_dtype.name)
            )
    return dims


def fingerprint(config: Config) -> str:
    """blake2b-16 hex of the model fields only.

    Layers, unsharded heads / dims / groups, the conv layout and kernel, the dtypes, the mixer. Not
    B, S, the commit mode, the history length or where the shard sits: two caches of one model
    with other batch sizes, verify lengths or TP sizes have one fingerprint.
    """
    conv = [(name, split, total) for name, split, total, *_ in _dims(config)[1:]]
    if config.conv_sections is None:  # no layout: the local block, which only an equal shard matches
        conv = [("conv", "shard", config.conv_dim, config.tp_size)]
    fields = {
        "layers": config.num_recurrent_layers,
        "heads": config.unsharded_num_heads,
        "head_dim": config.recurrent_state_head_dim,
        "state_size": config.recurrent_state_size,
        "groups": config.unsharded_n_groups,
        "conv": conv,
        "conv_kernel": config.conv_kernel,
        "recurrent_dtype": config.recurrent_state_dtype.name,
        "conv_dtype": config.conv_state_dtype.name,
        "mixer": config.mixer,
    }
    return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).hexdigest()


def _held(split: str, total: int, size: int, rank: int, groups: int) -> tuple[int, int] | None:
    """``[lo, hi)`` of a dimension that rank ``rank`` of ``size`` holds, or None when no such shard exists."""
    if split == "shard":
        return (0, total) if size == 1 else None
    if split == "groups" and groups % size:
        return (0, total) if groups == 1 else None  # one group: replicated on every rank
    if total % size:
        return None
    share = total // size
    return (rank * share, (rank + 1) * share)


def layout(config: Config, source: tuple[int, int], dest: tuple[int, int], count: int) -> list[Part]:
    """The parts of the piece that source rank ``source = (rank, size)`` sends to ``dest = (rank, size)``.

    ``config`` is either side's config (they share the model fields); the source holds what
    ``_held`` gives for its rank, the destination likewise, and each part is their overlap.
    Empty when they share no head (a section every rank keeps whole travels only with shared heads).

    Raises:
        ParcelError: either side's TP size cannot split this model's heads or groups (its shards
            would not tile the same heads), or the conv channels follow no mixer layout and the
            shards differ.
    """
    parts, offset = [], 0
    groups = config.unsharded_n_groups
    for name, split, total, _, _, unit_elems, dtype in _dims(config):
        held = []
        for side, (rank, size) in (("source", source), ("destination", dest)):
            span = _held(split, total, size, rank, groups)
            if span is None:
                raise ParcelError(
                    f"a {side} of TP size {size} cannot hold the model's {name} ({total} units split with the "
                    f"{split}, {groups} groups): the shards would not tile the same heads; nothing was changed"
                )
            held.append(span)
        lo, hi = max(held[0][0], held[1][0]), min(held[0][1], held[1][1])
        if split == "shard" and source != dest:
            raise ParcelError(
                "conv_dim follows no mixer layout (Config.conv_sections is None): such a state moves only between "
                f"equal shards, not from rank {source} to {dest}; nothing was changed"
            )
        if lo >= hi:
            if name == "recurrent":  # no shared head: no piece (whole sections ride along with heads only)
                return []
            continue
        parts.append(Part(name, lo, hi, unit_elems, dtype, offset))
        offset += (
            -(-count * config.num_recurrent_layers * (hi - lo) * unit_elems * np.dtype(dtype).itemsize // ALIGN) * ALIGN
        )
    return parts


def buffer_bytes(config: Config, parts: list[Part], count: int) -> int:
    """Bytes of a buffer of ``parts`` for ``count`` slots (the last part unpadded)."""
    if not parts:
        return 0
    last = parts[-1]
    return (
        last.offset
        + count * config.num_recurrent_layers * (last.hi - last.lo) * last.unit_elems * np.dtype(last.dtype).itemsize
    )


def runs(config: Config, parts: list[Part], slot_rows: np.ndarray, pool_slots: int) -> np.ndarray:
    """The byte runs between the pools and a buffer: int64 ``[R, 4]`` of (pool, pool offset, buffer offset, bytes).

    ``pool`` is 0 (recurrent) or 1 (conv); offsets are bytes into the pool seen flat and into the
    buffer. Buffer row ``r`` (of ``count``) is pool slot ``slot_rows[r]`` of a ``[L, pool_slots, ...]``
    pool; rows whose slot is negative (padding) have no runs. One run per (row, layer, part): the
    part's units are contiguous in both.
    """
    layers = config.num_recurrent_layers
    local = {name: (start, offset_units) for name, offset_units, start in _local_starts(config)}
    rows = np.flatnonzero(slot_rows >= 0)
    table = []
    for part in parts:
        pool = 0 if part.name == "recurrent" else 1
        itemsize = np.dtype(part.dtype).itemsize
        slot_elems = config.recurrent_slot_elems if pool == 0 else config.conv_slot_elems
        start, first = local[part.name]
        run = (part.hi - part.lo) * part.unit_elems * itemsize
        within = (first + part.lo - start) * part.unit_elems * itemsize
        r, layer = np.meshgrid(rows, np.arange(layers), indexing="ij")
        src = (layer * pool_slots + slot_rows[r].astype(np.int64)) * slot_elems * itemsize + within
        dst = part.offset + (r.astype(np.int64) * layers + layer) * run
        table.append(np.stack([np.full(src.size, pool), src.ravel(), dst.ravel(), np.full(src.size, run)], axis=1))
    return np.concatenate(table).astype(np.int64) if table else np.zeros((0, 4), np.int64)


def _local_starts(config: Config) -> list:
    """``(name, first local unit, first model unit)`` of each split dimension of this shard."""
    out = [("recurrent", 0, config.head_range[0])]
    sections = config.conv_sections
    if sections is None:
        return [*out, ("conv", 0, 0)]
    return out + [(s.name, s.offset, s.start) for s in sections]


# ---------------------------------------------------------------- checksums
def adler32_chunks(buffer: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Adler-32 of each ``chunk_bytes`` chunk of a byte buffer (the NumPy twin of the device kernel).

    ``A = 1 + sum(b_i)``, ``B = len + sum((len - i) * b_i)``, both mod 65521, checksum ``B << 16 | A``
    (zlib's Adler-32 of the chunk). Any single changed byte changes ``A`` (a change of at most 255
    is never a multiple of 65521), so every single flipped byte is detected.

    Args:
        buffer: 1-D uint8.
        chunk_bytes: the chunk length.

    Returns:
        uint32 ``[ceil(len / chunk_bytes)]``.
    """
    data = np.asarray(buffer, dtype=np.uint8).reshape(-1)
    sums = []
    for start in range(0, data.size, chunk_bytes):
        chunk = data[start : start + chunk_bytes].astype(np.uint64)
        n = chunk.size
        a = (1 + int(chunk.sum())) % ADLER_MOD
        b = (n + int((chunk * np.arange(n, 0, -1, dtype=np.uint64)).sum())) % ADLER_MOD
        sums.append((b << 16) | a)
    return np.array(sums, dtype=np.uint32)


def checksum_digest(checksums: Any) -> str:
    """blake2b-16 hex of the chunk checksums (little-endian uint32)."""
    return hashlib.blake2b(np.asarray(checksums, dtype="<u4").tobytes(), digest_size=16).hexdigest()
