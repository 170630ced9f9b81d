"""Which attention kernels an engine runs, chosen once when its runner is built.

Everything the choice depends on is fixed for the engine's life: the device, the model's dtype, the head
size and which kernels compiled here (the KV cache is always one contiguous tensor of the model's dtype or
int8 codes, which every kernel takes). So ModelRunner asks select_attention_backend once and hands the
AttentionBackend to every step through AttentionMetadata; no layer asks a kernel whether it applies.

- "paged_attention (C++)": CPU, bf16 or fp32, kernels/paged_attention.cpp built (AVX-512 or AVX2). With
  kernels/rope_kv.cpp built too, RoPE and the cache write run in one op (attention.fused_attention);
- "triton": CUDA (compute capability 8.0+, triton installed), bf16/fp16/fp32, head_dim up to 256; reads
  context lengths from tensors only, which lets model_runner.DecodeGraphs replay decode steps as CUDA graphs;
- "torch": attention._decode_reference, everywhere else. It is the oracle the kernels are tested against
  and can be asked for explicitly (reference=True).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engines.torch.kernels import paged_attention, rope_kv, triton_paged_attention

# (q [B, H, D], cache [2, KVH, NB, BS, D] (int8 view of a quantized cache), block_tables [B, W], context_lens [B],
#  scale, k_scale [KVH] | None, v_scale [KVH] | None, kind "model" | "int8" | "fp8", sliding window | None)
#  -> [B, H, D] in q's dtype
DecodeKernel = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        float,
        torch.Tensor | None,
        torch.Tensor | None,
        str,
        int | None,
    ],
    torch.Tensor,
]


@dataclass(frozen=True)
class AttentionBackend:
    name: str  # what the load log says
    decode_kernel: DecodeKernel | None  # the decode rows' attention; None: attention._decode_reference
    fused_rope: bool = False  # RoPE and the cache write in rope_kv's op (attention.fused_attention)
    graph_safe: bool = False  # decode reads no Python int per step, so a CUDA graph can replay it

    def describe(self) -> str:
        return self.name + (" with RoPE and the KV write fused (rope_kv)" if self.fused_rope else "")


TORCH_ATTENTION = AttentionBackend("torch", None)
CPP_ATTENTION = AttentionBackend("paged_attention (C++)", paged_attention.decode_attention)
CPP_FUSED_ATTENTION = AttentionBackend("paged_attention (C++)", paged_attention.decode_attention, fused_rope=True)
TRITON_ATTENTION = AttentionBackend("triton", triton_paged_attention.decode_attention, graph_safe=True)


def select_attention_backend(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    *,
    reference: bool = False,
    fused_rope: bool = True,
    capped: bool = False,
) -> AttentionBackend:
    """The fastest backend that runs a model of `dtype` and `head_dim` on `device` here (compiling the CPU
    kernels on first use); reference=True: the torch path whatever is available. fused_rope=False: the model's
    RoPE is not rope_kv's (its class's fused_rope), so it stays on the torch path. capped: some layers soft-cap
    their attention, which no kernel does (every kernel takes a sliding window); those layers' decode rows run
    attention._decode_reference, whose per-step context length a CUDA graph would freeze, so on CUDA the whole
    model takes the torch path."""
    if reference or (capped and device.type == "cuda"):
        return TORCH_ATTENTION
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and paged_attention.available():
        return CPP_FUSED_ATTENTION if fused_rope and rope_kv.available() else CPP_ATTENTION
    if triton_paged_attention.takes(dtype, head_dim) and triton_paged_attention.available(device):
        return TRITON_ATTENTION
    return TORCH_ATTENTION
