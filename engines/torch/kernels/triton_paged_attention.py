"""Paged decode attention on CUDA in Triton, one query token per sequence.

Why not the torch path on a GPU: attention._decode_reference gathers every sequence's context into a
padded [kv_heads, B, max_context, head_dim] copy each step, sized by decode_max_context, a Python int.
A CUDA graph would freeze that int (and the gather's shape) at capture. This kernel takes only tensors
(block tables, context lengths) and walks each sequence's own blocks in place, so one captured graph
serves every decode step of its batch size (model_runner.DecodeGraphs) and no step copies the context.

One program per (sequence, KV head): the query heads sharing that KV head (the GQA group, padded to 16
rows for tl.dot) stream the context in tiles of BLOCK_N tokens with an online softmax in float32. Same
semantics as _decode_reference and the CPU kernel (paged_attention.cpp; a sliding window starts the walk at its
first key): a quantized cache holds int8
codes or float8_e4m3fn bytes, value = code * scale per KV head; the key scale is folded into q and the
value scale into the output. fp8 bytes are widened with KVLayer.widen's bit trick (E4M3 bits placed in
an fp16 are code * 2**-8, the 2**8 goes into the scale): integer ops any GPU runs, where Triton's
float8e4nv type needs SM 89+. Both dots are float32 with input_precision="ieee": tf32 would round q and k
to 10 mantissa bits.

The kernel itself is in triton_paged_attention_kernel.py, imported (with triton) on the first call, so
installs without triton (CPU) never need it. It runs on CPU under TRITON_INTERPRET=1
(tests/test_triton_paged_attention.py), which checks the math but neither input_precision nor GPU
performance. No split over the context (flash-decoding): a long context at a small batch keeps only
batch * kv_heads programs busy.
"""

from __future__ import annotations

import functools

import torch

BLOCK_N = 32  # context tokens per tile
_KINDS = {"model": 0, "int8": 1, "fp8": 2}


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(device: torch.device | str) -> bool:
    """True on a CUDA device Triton supports (compute capability 8.0+) when triton is installed."""
    device = torch.device(device)
    return device.type == "cuda" and _triton_importable() and torch.cuda.get_device_capability(device) >= (8, 0)


DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # of q; the cache is q's dtype or int8 codes
MAX_HEAD_DIM = 256  # one tile of registers


def takes(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether decode_attention takes a model of this dtype and head size (on a device where `available`)."""
    return dtype in DTYPES and head_dim <= MAX_HEAD_DIM


def decode_attention(
    q: torch.Tensor,  # [B, H, D] bf16 | fp16 | fp32
    cache: torch.Tensor,  # [2, KVH, NB, BS, D] q's dtype | int8 (fp8 caches: their int8 view)
    block_tables: torch.Tensor,  # [B, W] int64, padded rows allowed
    context_lens: torch.Tensor,  # [B] int64, each >= 1
    scale: float,
    k_scale: torch.Tensor | None = None,  # [KVH] fp32, quantized kinds only
    v_scale: torch.Tensor | None = None,
    kind: str = "model",  # "model" | "int8" | "fp8"
    window: int | None = None,  # a sliding-window layer: only the last `window` tokens of each context
) -> torch.Tensor:  # [B, H, D] in q's dtype
    import triton

    from engines.torch.kernels.triton_paged_attention_kernel import decode_kernel

    b, heads, head_dim = q.shape
    kv_heads, block_size = cache.shape[1], cache.shape[3]
    group = heads // kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables.contiguous()
    # float32 out, rounded by torch below: round-to-nearest-even as _decode_reference (Triton's interpreter
    # truncates in its own fp32 -> bf16 cast)
    out = torch.empty(b, heads, head_dim, dtype=torch.float32, device=q.device)
    decode_kernel[(b, kv_heads)](
        q,
        cache,
        block_tables,
        context_lens,
        k_scale,
        v_scale,
        out,
        float(scale),
        window or 0,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        BLOCK_N=BLOCK_N,
        KIND=_KINDS[kind],
    )
    return out.to(q.dtype)
