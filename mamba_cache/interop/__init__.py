"""Interoperability with other array libraries: DLPack export and import (``mamba_cache.interop.dlpack``).

The layer tensors both backends hand out export DLPack (``torch.from_dlpack``, ``cupy.from_dlpack``,
``jax.dlpack.from_dlpack``, ``numpy.from_dlpack`` for host memory), with the bfloat16 type code for
bfloat16 pools; arguments that take arrays also accept objects that only speak DLPack.
"""

from .dlpack import DLPackView, consume_capsule, from_dlpack, to_capsule

__all__ = ["DLPackView", "consume_capsule", "from_dlpack", "to_capsule"]
