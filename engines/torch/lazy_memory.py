"""Host tensors whose pages become resident only when first written.

The KV pool is sized for the worst case (every block in use) but a server mostly holds a fraction of it. A
torch.zeros pool is zero-filled at allocation, so every page of it is resident from the start: 1 GiB of RSS
for the default pool before the first request (docs/performance.md, "Resident memory"). An anonymous private
mapping reads as zeros by contract (the kernel maps its shared zero page) and gets a private page only when a
block is first written, so RSS grows with the blocks actually used.

Transparent huge pages are refused for the mapping: a block of one layer and head is 2 KiB, and with THP on
"always" writing it would fault in 2 MiB, making the first few blocks of each layer and head resident at
hundreds of MiB in all.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor of `shape` backed by its own anonymous mapping (released when the tensor is)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    # frombuffer keeps a reference to the mapping for as long as any view of the tensor lives
    return torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(shape)
