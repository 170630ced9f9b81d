"""Pre-quantized checkpoints written the way their tools write them, for tests/test_prequantized.py: each writer
quantizes one nn.Linear weight [N, K] and returns (its tensors under the checkpoint's names, the dequantized float32
weight those tensors stand for). GPTQ and AWQ pack as AutoGPTQ and AutoAWQ do (neither installs without CUDA);
compressed-tensors' own compressors write and dequantize theirs."""

from __future__ import annotations

import torch

from engines.quant.fp8 import quantize_fp8

PACK_SHIFTS = torch.arange(0, 32, 4)


def rtn_groups(w: torch.Tensor, bits: int, symmetric: bool, group_of: torch.Tensor, groups: int):
    """Round-to-nearest per (row, group) as GPTQ's Quantizer.find_params sets it up: unsigned codes [N, K], unsigned
    zero points [N, G] (2**(bits-1) when symmetric) and scales [N, G] rounded to fp16 as the checkpoints store them."""
    maxq = (1 << bits) - 1
    n, _ = w.shape
    scales = torch.empty(n, groups)
    zeros = torch.empty(n, groups)
    for g in range(groups):
        cols = w[:, group_of == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if symmetric:
            amax = torch.maximum(lo.abs(), hi)
            scales[:, g] = 2 * amax / maxq
            zeros[:, g] = (maxq + 1) / 2
        else:
            scales[:, g] = (hi - lo) / maxq
            zeros[:, g] = torch.round(-lo / scales[:, g])
    scales = scales.half().float()
    s, z = scales[:, group_of], zeros[:, group_of]
    codes = torch.clamp(torch.round(w / s) + z, 0, maxq).to(torch.int32)
    return codes, zeros.to(torch.int32), scales


def pack_along_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] unsigned -> int32 [R * bits / 32, C], row j of each 32/bits in bits [j * bits, ...) (QuantLinear.pack)."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(-1, per, codes.shape[1])
    shifts = torch.arange(0, 32, bits).view(1, -1, 1)
    return ((c << shifts).sum(1) & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def gptq_linear(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, perm: torch.Tensor | None, v1: bool):
    """AutoGPTQ's layout (qlinear_cuda_old.QuantLinear.pack): qweight [K*bits/32, N] packed along K, qzeros
    [G, N*bits/32] packed along N holding zero - 1 in checkpoint_format gptq (v1), scales fp16 [G, N], g_idx [K].
    perm: act-order's column order (desc_act), g_idx[perm[i]] = i // group_size."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    order = torch.arange(k) if perm is None else perm
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    codes, zeros, scales = rtn_groups(w, bits, symmetric, g_idx.long(), k // gs)
    stored_zeros = (zeros - (1 if v1 else 0)) & ((1 << bits) - 1)
    tensors = {
        "qweight": pack_along_rows(codes.t().contiguous(), bits),
        "qzeros": pack_along_rows(stored_zeros.contiguous(), bits).t().contiguous(),  # [N, G] packed along N
        "scales": scales.t().contiguous().half(),
        "g_idx": g_idx,
    }
    # AutoGPTQ's forward: scales[g_idx] * (q - (stored zero + 1)) for v1
    dequant = (codes - zeros[:, g_idx.long()]).float() * scales[:, g_idx.long()]
    return tensors, dequant


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """[R, N] unsigned 4-bit -> int32 [R, N / 8]: slot i of each word holds column AWQ_ORDER[i] of its eight
    (AutoAWQ's WQLinear_GEMM.from_linear)."""
    r, n = codes.shape
    eight = codes.to(torch.int64).reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)]
    return ((eight << (PACK_SHIFTS.view(1, 1, -1))).sum(-1) & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def awq_linear(w: torch.Tensor, group_size: int):
    """AutoAWQ's GEMM layout, zero-point quantization (awq/quantize/quantizer.py pseudo_quantize_tensor):
    qweight [K, N/8], qzeros [G, N/8], scales fp16 [G, N]."""
    n, k = w.shape
    group_of = torch.arange(k) // group_size
    codes, zeros, scales = rtn_groups(w, 4, False, group_of, k // group_size)
    tensors = {
        "qweight": pack_awq(codes.t().contiguous()),
        "qzeros": pack_awq(zeros.t().contiguous()),
        "scales": scales.t().contiguous().half(),
    }
    return tensors, (codes - zeros[:, group_of]).float() * scales[:, group_of]


def fp8_linear(w: torch.Tensor, per_channel: bool):
    """weight e4m3 and weight_scale float32 ([N, 1] per channel, [] per tensor), as vLLM's Fp8Config reads them."""
    w8, scale = quantize_fp8(w, per_channel)
    return {"weight": w8, "weight_scale": scale}, w8.float() * scale


def compressed_tensors_linear(w: torch.Tensor, scheme, fmt: str):
    """compressed-tensors' own compressor for `fmt` (pack-quantized, int-quantized, float-quantized); qparams from
    the weight's min/max per channel, group or tensor (calculate_qparams, as llm-compressor's MinMax observer feeds
    it)."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = scheme.weights
    n, k = w.shape
    if args.strategy == "group":
        view = w.reshape(n, k // args.group_size, args.group_size)
        lo, hi = view.amin(-1), view.amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zero_point = calculate_qparams(lo, hi, args)
    state = {"weight": w, "weight_scale": scale.to(torch.float16 if args.type == "int" else torch.float32)}
    state["weight_zero_point"] = zero_point
    compressor = PackedQuantizationCompressor if fmt == "pack-quantized" else NaiveQuantizationCompressor
    stored = compressor.compress(state, scheme)
    # dequantized in float32 (the library would round w to its fp16 scales' dtype; kiln computes in float32)
    restored = compressor.decompress(dict(stored) | {"weight_scale": stored["weight_scale"].float()}, scheme)["weight"]
    return stored, restored.float()


def activation_ranges(state: dict[str, torch.Tensor], config, prompts: list[list[int]]) -> dict[str, float]:
    """max |x| of every projection's input ("{module}.input") and of each layer's keys and values
    ("model.layers.{i}.self_attn.k" / ".v") over `prompts`, from transformers' forward of the float model: what
    llm-compressor's static observers measure. Keys are measured before RoPE, which rotates pairs of channels, so
    sqrt(2) times their max bounds them after it."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state)
    ranges: dict[str, float] = {}

    def record(key: str, t: torch.Tensor) -> None:
        ranges[key] = max(ranges.get(key, 0.0), float(t.abs().max()))

    hooks = []
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and name.endswith("_proj"):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: record(f"{n}.input", i[0])))
            if name.endswith(("k_proj", "v_proj")):
                key = name.removesuffix("_proj")  # model.layers.{i}.self_attn.k / .v
                scale = 2**0.5 if name.endswith("k_proj") else 1.0
                hooks.append(module.register_forward_hook(lambda m, i, o, k=key, s=scale: record(k, o * s)))
    with torch.no_grad():
        for ids in prompts:
            model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return ranges


def static_fp8_scale(amax: float) -> torch.Tensor:
    """compressed-tensors' static per-tensor FP8 scale for the range [-amax, amax] (calculate_qparams): [1]."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False)
    scale, _ = calculate_qparams(torch.tensor([-amax]), torch.tensor([amax]), args)
    return scale.float()
