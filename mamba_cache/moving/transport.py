"""Sending a state parcel over ``torch.distributed`` point-to-point (NCCL between GPUs, gloo between CPUs).

The process group is the caller's: nothing here initialises, owns or tears down a group. A parcel
travels as three messages per piece:

```text
int64 [4]  (MAGIC, pieces, header bytes, buffer bytes)   the first tensor of each piece
uint8 [header bytes]                                      ParcelDescriptor.to_json()
uint8 [buffer bytes]                                      the piece's buffer, as is
```

On an NCCL group every tensor lives on the current CUDA device (the Numba backend's device buffer
is sent without a copy, through ``__cuda_array_interface__``); on gloo on the host. The receiver
checks nothing but the framing: ``import_slots`` checks the descriptor and every checksum before
it writes a byte, so a damaged transfer is refused there with every slot untouched.

Another transport (NIXL, UCX, a socket, a file) moves the same two things: the descriptor's JSON
and the buffer's bytes; rebuild the parcel with
``StateParcel(((ParcelDescriptor.from_json(header), buffer),))`` and import it.
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np

from .parcel import ParcelDescriptor, ParcelError, StateParcel

__all__ = ["MAGIC", "TransferError", "recv_parcel", "send_parcel"]

#: The first word of every piece's framing ("mambaprc" as a little-endian int64).
MAGIC = int.from_bytes(b"mambaprc", "little")
#: The largest descriptor a receiver accepts (a descriptor is a few KiB; this bounds a garbled length).
MAX_HEADER_BYTES = 64 << 20


class TransferError(ConnectionError):
    """A parcel could not be received (the peer died, the wait timed out, or the framing is not a parcel's).

    Nothing was imported: receiving never touches a slot.
    """


def _device(group: Any) -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_tensor(buffer: Any, device: Any) -> Any:
    """A uint8 tensor of the buffer's bytes on ``device`` (no copy where the memory already is there)."""
    import torch

    if isinstance(buffer, torch.Tensor):
        tensor = buffer
    elif hasattr(buffer, "__cuda_array_interface__"):
        tensor = torch.as_tensor(buffer, device="cuda")
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(buffer, dtype=np.uint8)))
    return tensor.to(device)


def send_parcel(parcel: StateParcel, dst: int, group: Any = None) -> None:
    """Send every piece of ``parcel`` to rank ``dst`` of ``group`` (blocking, point-to-point).

    Send ``parcel.for_rank(j)`` to give a destination rank only its own piece.

    Args:
        parcel: from ``export_slots``.
        dst: the receiving rank (in ``group``).
        group: the caller's process group (``None``: the default group).

    Raises:
        TypeError: ``parcel`` is not a StateParcel.
        TransferError: the send failed (the receiver died, or the group timed out).
    """
    import torch
    import torch.distributed as dist

    if not isinstance(parcel, StateParcel):
        raise TypeError(f"parcel must be a StateParcel, got {type(parcel).__name__}")
    device = _device(group)
    try:
        for descriptor, buffer in parcel.pieces:
            header = np.frombuffer(descriptor.to_json(), dtype=np.uint8)
            frame = torch.tensor([MAGIC, len(parcel.pieces), header.size, descriptor.nbytes], dtype=torch.int64)
            dist.send(frame.to(device), dst, group=group)
            dist.send(torch.from_numpy(header.copy()).to(device), dst, group=group)
            dist.send(_as_tensor(buffer, device), dst, group=group)
    except RuntimeError as error:
        raise TransferError(f"send_parcel: sending to rank {dst} failed ({error})") from error


def recv_parcel(src: int, group: Any = None, timeout: float | None = None) -> StateParcel:
    """Receive a parcel that rank ``src`` sends with ``send_parcel`` (blocking, point-to-point).

    Args:
        src: the sending rank (in ``group``).
        group: the caller's process group (``None``: the default group).
        timeout: seconds to wait for each message (``None``: the group's own timeout).

    Returns:
        The parcel: its buffers are host ``numpy.ndarray`` on gloo, CUDA tensors on NCCL (both
        are what ``import_slots`` takes on the matching backend).

    Raises:
        TransferError: the sender died or closed the connection, a wait timed out, or the
            framing is not a parcel's; nothing was imported.
    """
    import torch

    device = _device(group)
    pieces, expected = [], 1
    while len(pieces) < expected:
        frame = _receive(torch.empty(4, dtype=torch.int64, device=device), src, group, timeout)
        magic, expected, header_bytes, nbytes = (int(v) for v in frame.cpu())
        if magic != MAGIC or expected < 1 or not 0 < header_bytes <= MAX_HEADER_BYTES or nbytes < 0:
            raise TransferError(f"recv_parcel: rank {src} sent something that is not a state parcel's framing")
        header = _receive(torch.empty(header_bytes, dtype=torch.uint8, device=device), src, group, timeout)
        try:
            descriptor = ParcelDescriptor.from_json(header.cpu().numpy().tobytes())
        except ParcelError as error:
            raise TransferError(f"recv_parcel: rank {src} sent an unreadable descriptor ({error})") from None
        buffer = _receive(torch.empty(nbytes, dtype=torch.uint8, device=device), src, group, timeout)
        pieces.append((descriptor, buffer.numpy() if device.type == "cpu" else buffer))
    return StateParcel(tuple(pieces))


def _receive(tensor: Any, src: int, group: Any, timeout: float | None) -> Any:
    import torch.distributed as dist

    try:
        work = dist.irecv(tensor, src, group=group)
        if timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        raise TransferError(
            f"recv_parcel: receiving from rank {src} failed ({str(error).splitlines()[0]}); nothing was imported"
        ) from error
    return tensor
