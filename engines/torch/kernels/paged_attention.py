"""Paged decode attention on CPU in one op (paged_attention.cpp), one query token per sequence.

attention._decode_reference runs ~10 small ops per layer (index_select gather, fp32 copy, two bmm,
masked_fill, softmax, casts), a large share of a decode step (docs/performance.md).
The kernel walks each sequence's block table directly, one task per (sequence, KV head), fp32 math,
same semantics (quantized caches: value = code * scale per KV head; fp8 e4m3fn decoded by table; a sliding
window skips the keys before it).
Compiled on first use like rms_norm (g++ and ninja; cached in TORCH_EXTENSIONS_DIR), for AVX-512 or AVX2
(isa_variants.py), so available() is False only below AVX2 or when the build fails (one warning); callers then
keep the torch path. The AVX-512 build scores bf16 caches with AVX512-BF16 dot products where
extension.cpu_flags() has avx512_bf16 (so KILN_CPU_ISA below avx512bf16 turns that off). Takes bf16/fp32 q over
a contiguous CPU cache of q's dtype or int8 codes: attention_backend.select_attention_backend picks it once per
engine where that always holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.torch.kernels import extension
from engines.torch.kernels.isa_variants import IsaVariants

_SOURCE = Path(__file__).with_name("paged_attention.cpp")
_EXT = IsaVariants(
    "kiln_paged_attention",
    _SOURCE,
    ["-O3", "-std=c++17", "-fopenmp"],
    ldflags=["-fopenmp"],
    fallback="the torch decode path",
)
BF16_DOT_FLAG = "avx512_bf16"  # the CPU flag of the AVX-512 build's bf16 x bf16 dot products (vdpbf16ps)


def available() -> bool:
    """True when the compiled kernel can be used (compiles or loads it on the first call)."""
    return _EXT.available()


def decode_attention(
    q: torch.Tensor,  # [B, H, D] bf16 | fp32
    cache: torch.Tensor,  # [2, KVH, NB, BS, D] bf16 | fp32 | int8 (fp8 caches: their int8 view)
    block_tables: torch.Tensor,  # [B, W] int64, padded rows allowed
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
    k_scale: torch.Tensor | None = None,  # [KVH] fp32, quantized kinds only
    v_scale: torch.Tensor | None = None,
    kind: str = "model",  # "model" | "int8" | "fp8"
    window: int | None = None,  # a sliding-window layer: only the last `window` tokens of each context
) -> torch.Tensor:  # [B, H, D] in q's dtype
    ext = _EXT.get()
    if ext is None:
        raise RuntimeError("the paged_attention kernel is unavailable")
    bf16_dot = BF16_DOT_FLAG in extension.cpu_flags()  # a cached set: one lookup per layer and step
    return ext.decode_attention(
        q.contiguous(), cache, block_tables, context_lens, float(scale), k_scale, v_scale, kind, bf16_dot, window or 0
    )
