"""RoPE on q and k plus the KV-cache write of a decode step in one C++ op (rope_kv.cpp).

The torch path (llama._rotate, then attention.write_kv or KVLayer.write) is ~15 small ops per layer;
this op gives the same bits (see the .cpp) and returns the rotated queries for decode attention.
Compiled on first use like the other kernels (g++ and ninja; cached in TORCH_EXTENSIONS_DIR), for AVX-512 or
AVX2 (isa_variants.py). available() is False on other CPUs and when the build fails (one warning); callers then
keep the torch path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.torch.kernels.isa_variants import IsaVariants

_SOURCE = Path(__file__).with_name("rope_kv.cpp")
# -ffp-contract=off: x * cos + swapped * sin must round twice, as torch's separate ops do
_EXT = IsaVariants(
    "kiln_rope_kv",
    _SOURCE,
    ["-O3", "-ffp-contract=off", "-std=c++17", "-fopenmp"],
    ldflags=["-fopenmp"],
    fallback="the torch RoPE path",
)


def available() -> bool:
    """True when the compiled kernel can be used (compiles or loads it on the first call)."""
    return _EXT.available()


def rope_store(
    qkv: torch.Tensor,  # [T, (H + 2 KVH) D] bf16 | fp32, contiguous
    cos: torch.Tensor,  # [P, D] qkv's dtype
    sin: torch.Tensor,  # [P, D] sign-folded (llama.init_rope)
    positions: torch.Tensor,  # [T] int64
    slots: torch.Tensor,  # [T] int64
    cache: torch.Tensor,  # [2, KVH, NB, BS, D] qkv's dtype, or int8 codes
    scales: torch.Tensor | None,  # [2, KVH] fp32 for int8 / fp8 caches
    kind: str,  # "model" | "int8" | "fp8"
    heads: int,
    kv_heads: int,
    return_keys: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # q [T, H, D] rotated, and with return_keys k [T, KVH, D]
    ext = _EXT.get()
    if ext is None:
        raise RuntimeError("the rope_kv kernel is unavailable")
    q, k = ext.rope_store(qkv, cos, sin, positions, slots, cache, scales, kind, heads, kv_heads, return_keys)
    return (q, k) if return_keys else q
