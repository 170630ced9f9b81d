"""Llama-family decoder in plain PyTorch: Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (qkv bias),
SmolLM2 (tied embeddings).

Tokens of a step arrive flattened ([T]) with their positions; q/k/v and gate/up projections are
fused into one matmul each (fewer ops per step, PERF-NOTES.md); logits are computed only for the
rows that sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from engines.torch.attention import AttentionMetadata, paged_attention
from engines.torch.layers.linear import LinearDispatch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaArgs:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    sliding_window: int | None
    inv_freq: torch.Tensor
    rope_scaling: float  # multiplies cos/sin (1.0 except for yarn/longrope)

    @classmethod
    def from_hf_config(cls, config) -> "LlamaArgs":
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Model type {config.model_type!r} is not supported; kiln's torch engine runs {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Activation {config.hidden_act!r} is not supported (only silu).")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, rope_scaling = _rope_parameters(config, head_dim)
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=window,
            inv_freq=inv_freq,
            rope_scaling=rope_scaling,
        )


def _rope_parameters(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """inv_freq exactly as transformers computes it (its own rope init functions for scaled types)."""
    params = getattr(config, "rope_parameters", None) or {}
    legacy = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("Dynamic NTK rope scaling is not supported (its frequencies depend on the sequence length).")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"Rope scaling type {rope_type!r} is not supported.")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.input_norm = nn.Parameter(torch.empty(args.hidden_size), requires_grad=False)
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.post_norm = nn.Parameter(torch.empty(args.hidden_size), requires_grad=False)
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.empty(args.hidden_size), requires_grad=False)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        self.scale = args.head_dim**-0.5
        self.linear = LinearDispatch(torch.float32, torch.device("cpu"))  # replaced by load_llama
        self.cos: torch.Tensor | None = None  # [max_positions, head_dim], built by init_rope
        self.sin: torch.Tensor | None = None  # sign-folded, see init_rope

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head

    def init_rope(self, max_positions: int, dtype: torch.dtype, device) -> None:
        if self.cos is not None and self.cos.shape[0] >= max_positions and self.cos.dtype == dtype:
            return  # engines sharing one model (tests) keep the larger table
        # Same arithmetic as transformers (fp32 outer product, cos/sin, then cast), so fp32 matches exactly.
        pos = torch.arange(max_positions, dtype=torch.float)
        freqs = pos[:, None] * self.args.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * self.args.rope_scaling).to(device=device, dtype=dtype)
        sin = (emb.sin() * self.args.rope_scaling).to(device=device, dtype=dtype)
        half = sin.shape[-1] // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin_lo, sin_hi]: the sign lives in the table
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],  # per layer [2, blocks, block_size, kv_heads, head_dim]
    ) -> torch.Tensor:  # [T, hidden]
        a = self.args
        eps = a.rms_norm_eps
        t = input_ids.shape[0]
        heads, kv_heads = a.num_heads, a.num_kv_heads
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, hd]
        sin = self.sin[positions].unsqueeze(1)
        linear = self.linear.for_rows(t)
        x = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = _rms_norm(x, layer.input_norm, eps)
            qkv = linear(h, layer.qkv_proj.weight, layer.qkv_proj.bias)
            # q and k rotate together: one RoPE for both
            qk = _rotate(qkv[:, : layer.q_size + layer.kv_size].view(t, heads + kv_heads, a.head_dim), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, layer.q_size + layer.kv_size :].view(t, kv_heads, a.head_dim)
            attn = paged_attention(q, k, v, kv_cache, meta, self.scale)
            x = x + linear(attn.reshape(t, layer.q_size), layer.o_proj.weight, None)
            h = _rms_norm(x, layer.post_norm, eps)
            gate, up = linear(h, layer.gate_up_proj.weight, None).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.down_proj.weight, None)
        return _rms_norm(x, self.norm, eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return self.linear.for_rows(hidden.shape[0])(hidden, self.lm_head_weight, None).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused op instead of eight; in float32 it equals transformers' LlamaRMSNorm bit for bit.
    return F.rms_norm(x, weight.shape, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * signed_sin


def load_llama(folder: Path, config, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Build the model on the meta device and move each checkpoint tensor into place once, so the
    weights exist in memory a single time (the fused projections are concatenated layer by layer)."""
    args = LlamaArgs.from_hf_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights.")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"Checkpoint in {folder} lacks tensor {name!r}.")
        return tensors.pop(name)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t, requires_grad=False)

    model.embed_tokens.weight = param(take("model.embed_tokens.weight"))
    model.norm = param(take("model.norm.weight"))
    if not args.tie_word_embeddings:
        model.lm_head = param(take("lm_head.weight"))
    tensors.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.input_norm = param(take(p + "input_layernorm.weight"))
        layer.post_norm = param(take(p + "post_attention_layernorm.weight"))
        qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        layer.qkv_proj.weight = param(torch.cat(qkv))
        layer.qkv_proj.bias = param(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])) if args.qkv_bias else None
        layer.o_proj.weight = param(take(p + "self_attn.o_proj.weight"))
        layer.gate_up_proj.weight = param(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
        layer.down_proj.weight = param(take(p + "mlp.down_proj.weight"))
        del qkv
    model.linear = LinearDispatch(dtype, device)
    leftovers = [n for n in tensors if "rotary_emb" not in n]
    if leftovers:
        raise ValueError(f"Checkpoint has tensors kiln does not know how to use: {leftovers[:5]}")
    return model.eval()
