"""Moving states between caches: parcels (export / import), their transport, and preemption.

- [`StateParcel`][mamba_cache.moving.parcel.StateParcel], `ParcelDescriptor`, `ParcelError`: what
  ``export_slots`` returns and ``import_slots`` checks (``parcel.py``, backend-neutral);
- ``send_parcel`` / ``recv_parcel`` (``mamba_cache.moving.transport``): over ``torch.distributed``
  point-to-point (imported on its own: it needs torch).
"""

from .parcel import CHUNK_BYTES, ParcelDescriptor, ParcelError, Part, StateParcel, adler32_chunks, fingerprint

__all__ = ["CHUNK_BYTES", "ParcelDescriptor", "ParcelError", "Part", "StateParcel", "adler32_chunks", "fingerprint"]
