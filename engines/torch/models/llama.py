"""Llama-family decoder in plain PyTorch: Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (qkv bias),
SmolLM2 (tied embeddings). Close families subclass LlamaForCausalLM and override only its hooks (embed, qkv,
layer_input, attention, after_attention, after_mlp, mlp) and layer_norms: Qwen3 (qwen3.py), OLMo 2
(olmo2.py), Gemma 2 and Gemma 3 (gemma.py), Phi-3 (phi3.py).

Tokens of a step arrive flattened ([T]) with their positions; q/k/v and gate/up projections are
fused into one matmul each (fewer ops per step, PERF-NOTES.md); logits are computed only for the
rows that sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.torch import step_rows
from engines.torch.attention import AttentionMetadata, fused_attention, paged_attention
from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.kernels.rms_norm import add_rms_norm, rms_norm
from engines.torch.kernels.silu_mul import silu_mul
from engines.torch.layers.linear import DenseLinear, LinearDispatch
from engines.torch.models.architecture import Architecture, CheckpointPart
from engines.torch.models.params import decoder_param_count
from engines.torch.models.topology import NormGroup, QuantTopology, RowFold


@dataclass
class LlamaArgs:
    model_type: str  # the registry entry (engines/torch/models/registry.py) these args were made by
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
    o_bias: bool  # transformers gives o_proj a bias with attention_bias (Llama, Qwen3, OLMo 2), never Qwen2
    max_position_embeddings: int
    layer_windows: tuple[int | None, ...]  # per layer: its sliding window, None where it sees the whole context
    inv_freq: torch.Tensor
    rope_scaling: float  # multiplies cos/sin (1.0 except for yarn/longrope)

    @classmethod
    def from_hf_config(cls, config: Any) -> LlamaArgs:
        """The args a Llama or Mistral config.json describes (other families adjust them: qwen2_args)."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Activation {config.hidden_act!r} is not supported (only silu).")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq, rope_scaling = _rope_parameters(config, head_dim)
        return cls(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(config, "attention_bias", False)),
            o_bias=bool(getattr(config, "attention_bias", False)),
            max_position_embeddings=config.max_position_embeddings,
            layer_windows=layer_windows(config),
            inv_freq=inv_freq,
            rope_scaling=rope_scaling,
        )


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window as transformers applies it: a config with sliding_window and no layer_types
    (Mistral, Phi-3) windows every layer; one with layer_types windows its sliding_attention layers (Qwen2 and
    Qwen3 derive them from max_window_layers, Gemma alternates them); use_sliding_window false (Qwen2, Qwen3)
    turns the window off."""
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"Layer types {sorted(unknown)} are not supported.")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return tuple(window if t == "sliding_attention" else None for t in types)


def qwen2_args(config: Any) -> LlamaArgs:
    """Qwen2 is Llama with biases on q, k and v (its config has no attention_bias field: they are always
    there)."""
    return replace(LlamaArgs.from_hf_config(config), qkv_bias=True)


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
    """The norm weights its model class declares (LlamaForCausalLM.layer_norms) and four projections. A
    projection is any module mapping [T, K] -> [T, N]: DenseLinear for a Hugging Face checkpoint, a quantized
    layer for an engine built by `kiln build` (engines/torch/layers/formats.py); the loader assigns them."""

    def __init__(self, args: LlamaArgs, norms: Mapping[str, int]):
        super().__init__()
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        for name, size in norms.items():
            setattr(self, name, nn.Parameter(torch.empty(size), requires_grad=False))
        self.qkv_proj: nn.Module | None = None  # [T, hidden] -> [T, q_size + 2 * kv_size]
        self.o_proj: nn.Module | None = None  # [T, q_size] -> [T, hidden]
        self.gate_up_proj: nn.Module | None = None  # [T, hidden] -> [T, 2 * intermediate]
        self.down_proj: nn.Module | None = None  # [T, intermediate] -> [T, hidden]


class LlamaForCausalLM(nn.Module):
    projections: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # per layer, in order
    # whether the rope_kv kernel (one RoPE table over the whole head, plain attention) can run this model's
    # attention (a sliding window included); a variant whose attention it cannot express (soft-capping, partial
    # RoPE) says False and its `attention` hook runs on the torch path (ModelRunner asks select_attention_backend
    # accordingly)
    fused_rope: bool = True
    capped_attention: bool = False  # some layers soft-cap attention (select_attention_backend's `capped`)

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, self.layer_norms(args)) for _ in range(args.num_layers))
        for layer, window in zip(self.layers, args.layer_windows, strict=True):
            layer.window = window
        self.norm = nn.Parameter(torch.empty(args.hidden_size), requires_grad=False)
        self.lm_head: nn.Module | None = None  # [N, hidden] -> [N, vocab]; assigned by the loader
        self.scale = args.head_dim**-0.5
        self.cos: torch.Tensor | None = None  # [max_positions, head_dim], built by init_rope
        self.sin: torch.Tensor | None = None  # sign-folded, see init_rope

    @classmethod
    def layer_norms(cls, args: LlamaArgs) -> dict[str, int]:
        """Each layer's norm weights, kiln's name -> size (a variant with other norms overrides this, and reads
        its checkpoint with read_hf_checkpoint's `norms`)."""
        return {"input_norm": args.hidden_size, "post_norm": args.hidden_size}

    @property
    def lm_head_weight(self) -> torch.Tensor | None:
        """The dense LM head weight (the embeddings themselves when tied); None when quantized."""
        return getattr(self.lm_head, "weight", None)

    def init_rope(self, max_positions: int, dtype: torch.dtype, device) -> None:
        if self.cos is not None and self.cos.shape[0] >= max_positions and self.cos.dtype == dtype:
            return  # engines sharing one model (tests) keep the larger table
        self.cos, self.sin = rope_tables(self.args.inv_freq, self.args.rope_scaling, max_positions, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],  # per layer [2, blocks, block_size, kv_heads, head_dim]
    ) -> torch.Tensor:  # [T, hidden]
        # this step's rows of the RoPE tables ([T, 1, hd]) for the torch path
        rope = None if meta.fused else (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        x = self.embed(input_ids)  # the residual stream
        h = self.layer_input(self.layers[0], x)  # what the next sublayer reads
        layers = list(self.layers)  # (slicing the ModuleList would build a new one, module by module, every step)
        next_layers: list[nn.Module | None] = [*layers[1:], None]
        with step_rows.step(input_ids.shape[0], meta.num_decode_tokens):
            for layer, kv_cache, next_layer in zip(layers, kv_caches, next_layers):
                x, h = self.decoder_layer(layer, x, h, positions, rope, kv_cache, meta, next_layer)
        return h

    def decoder_layer(
        self,
        layer: nn.Module,
        x: torch.Tensor,  # the residual stream [T, hidden]
        h: torch.Tensor,  # the layer's input (layer_input of x)
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,  # this step's cos and sin rows; None on the fused path
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        next_layer: nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (residual, next layer's input or, after the last, the output)
        """One decoder layer. The build runs the layers of a model one at a time through this (engines/build/
        stream.py), with next_layer None: the residual it returns does not depend on the next layer."""
        heads, kv_heads = self.args.num_heads, self.args.num_kv_heads
        qkv = self.qkv(layer, h)
        if rope is None:  # RoPE and the cache write in one C++ op (and a decode-only step's attention in one more)
            attn = fused_attention(qkv, self.cos, self.sin, kv_cache, meta, self.scale, heads, kv_heads, layer.window)
        else:
            attn = self.attention(layer, qkv, positions, *rope, kv_cache, meta)
        x, h = self.after_attention(layer, x, layer.o_proj(attn.reshape(x.shape[0], layer.q_size)))
        return self.after_mlp(layer, x, self.mlp(layer, h), next_layer)

    # The hooks a variant overrides (engines/torch/models/qwen3.py, olmo2.py, gemma.py, phi3.py); everything else
    # is shared.

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> the residual stream [T, hidden]
        return self.embed_tokens(input_ids)

    def layer_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:  # residual [T, hidden] -> its input
        """What `layer` reads from the residual stream before it: the embeddings for the first layer (forward);
        for the others after_mlp computes the same, fused with the residual add."""
        return _rms_norm(x, layer.input_norm, self.args.rms_norm_eps)

    def qkv(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, q_size + 2 * kv_size]
        """q, k and v as RoPE and attention read them (the fused path reads them from this one tensor, which
        must stay contiguous)."""
        return layer.qkv_proj(h)

    def attention(
        self,
        layer: nn.Module,
        qkv: torch.Tensor,  # [T, q_size + 2 * kv_size]
        positions: torch.Tensor,  # [T]
        cos: torch.Tensor,  # [T, 1, head_dim]: this step's rows of the model's tables
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, heads, head_dim]
        """The torch path's RoPE, cache write and attention (the fused path runs fused_attention instead)."""
        return paged_attention(*self.rotated_qkv(layer, qkv, cos, sin), kv_cache, meta, self.scale, window=layer.window)

    def rotated_qkv(
        self, layer: nn.Module, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [T, heads, hd], k and v [T, kv_heads, hd]
        a, t = self.args, qkv.shape[0]
        # q and k rotate together: one RoPE for both
        qk = _rotate(qkv[:, : layer.q_size + layer.kv_size].view(t, a.num_heads + a.num_kv_heads, a.head_dim), cos, sin)
        v = qkv[:, layer.q_size + layer.kv_size :].view(t, a.num_kv_heads, a.head_dim)
        return qk[:, : a.num_heads], qk[:, a.num_heads :], v

    def after_attention(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (residual, attention output) -> (residual, the MLP's input)
        return add_rms_norm(x, out, layer.post_norm, self.args.rms_norm_eps)

    def after_mlp(
        self, layer: nn.Module, x: torch.Tensor, out: torch.Tensor, next_layer: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (residual, MLP output) -> (residual, next layer's input or the output)
        # the next norm takes the residual add before it in the same op
        norm = self.norm if next_layer is None else next_layer.input_norm
        return add_rms_norm(x, out, norm, self.args.rms_norm_eps)

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        """The layer's feed-forward block: a variant with another MLP layout overrides only this."""
        return layer.down_proj(silu_mul(layer.gate_up_proj(h)))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return self.lm_head(hidden).float()

    def load_layer(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        formats: Mapping[str, str],
        dispatch: LinearDispatch,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Put layer `index`'s weights in place: its tensors (kiln names, consumed from `tensors`), each projection
        in its stored format (engines/torch/layers/formats.py; missing kinds are dense)."""
        from engines.torch.layers.formats import make_linear

        layer, p = self.layers[index], f"layers.{index}."
        for name in self.layer_norms(self.args):
            if p + name + ".weight" not in tensors:
                raise KeyError(f"Weights lack tensor {p + name + '.weight'!r}.")
            weight = tensors.pop(p + name + ".weight").to(device=device, dtype=dtype)
            setattr(layer, name, nn.Parameter(weight, requires_grad=False))
        for kind in self.projections:
            setattr(layer, kind, make_linear(formats.get(kind, "dense"), tensors, p + kind, dispatch, dtype, device))

    def unload_layer(self, index: int) -> None:
        """Free layer `index`'s weights (back on the meta device): the build holds one layer at a time."""
        layer = self.layers[index]
        for name, size in self.layer_norms(self.args).items():
            setattr(layer, name, nn.Parameter(torch.empty(size, device="meta"), requires_grad=False))
        for kind in self.projections:
            setattr(layer, kind, None)


def rope_tables(
    inv_freq: torch.Tensor, scaling: float, max_positions: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [max_positions, 2 * len(inv_freq)], with the same arithmetic as transformers (fp32
    outer product, cos/sin, then cast), so fp32 matches exactly."""
    pos = torch.arange(max_positions, dtype=torch.float)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(device=device, dtype=dtype)
    sin = (emb.sin() * scaling).to(device=device, dtype=dtype)
    half = sin.shape[-1] // 2
    # rotate_half(x) * sin == swap_halves(x) * [-sin_lo, sin_hi]: the sign lives in the table
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # bf16 and float32 on CPU: kiln's one-pass kernel with transformers' LlamaRMSNorm rounding (F.rms_norm costs
    # ~10 ops on bf16; on float32 the kernel's mean of squares may differ from it in the last bit); elsewhere
    # F.rms_norm.
    return rms_norm(x, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * signed_sin


# each layer's norm weights: kiln's name -> the checkpoint's (under model.layers.{i}.)
LLAMA_NORMS = {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm"}


# Each kiln projection and the checkpoint modules (under model.layers.{i}.) whose rows it concatenates, in order
LLAMA_PROJECTIONS = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}

# (checkpoint, the checkpoint modules one kiln projection fuses, in row order, kiln's prefix) -> that projection's
# weight tensors under kiln's names (its bias is read apart, in the serving dtype). The default reads float weights;
# a pre-quantized checkpoint brings its own (engines/torch/prequantized).
LinearReader = Callable[[CheckpointTensors, Sequence[str], str], dict[str, torch.Tensor]]


def read_hf_checkpoint(
    folder: Path,
    args: LlamaArgs,
    dtype: torch.dtype,
    device: torch.device,
    norms: Mapping[str, str] = LLAMA_NORMS,
    linear: LinearReader | None = None,
    projections: Mapping[str, Sequence[str]] = LLAMA_PROJECTIONS,
    part: CheckpointPart | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under kiln's names (see assemble), cast to `dtype` as they are read,
    with q/k/v and gate/up concatenated layer by layer so each weight exists in memory once. norms: the
    layer norms of the model class (its layer_norms), kiln name -> checkpoint name. linear: how projection
    weights are read (float weights in `dtype` when None). projections: which checkpoint modules each kiln
    projection fuses (a checkpoint with fused ones of its own, Phi-3's, names those). part: only those layers
    (and the embeddings, final norm and head with part.outer); None reads all and refuses unused tensors."""

    def dense(ckpt: CheckpointTensors, modules: Sequence[str], prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + ".weight": torch.cat([ckpt.take(m + ".weight", dtype, device) for m in modules])}

    read_linear = linear or dense
    with CheckpointTensors(folder) as ckpt:

        def take(name: str) -> torch.Tensor:
            return ckpt.take(name, dtype, device)

        out: dict[str, torch.Tensor] = {}
        if part is None or part.outer:
            out |= {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
            if not args.tie_word_embeddings:
                out.update(read_linear(ckpt, ["lm_head"], "lm_head"))
            ckpt.take_optional("lm_head.weight")  # some tied checkpoints still carry a copy
        for i in range(args.num_layers) if part is None else part.layers:
            p, k = f"model.layers.{i}.", f"layers.{i}."
            for name, hf_name in norms.items():
                out[k + name + ".weight"] = take(p + hf_name + ".weight")
            for kind, modules in projections.items():
                out.update(read_linear(ckpt, [p + m for m in modules], k + kind))
            if args.qkv_bias:
                out[k + "qkv_proj.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            if args.o_bias:
                out[k + "o_proj.bias"] = take(p + "self_attn.o_proj.bias")
        leftovers = [n for n in ckpt.names() if "rotary_emb" not in n]
    if leftovers and part is None:
        raise ValueError(f"Checkpoint has tensors kiln does not know how to use: {leftovers[:5]}")
    return out


PROJECTIONS = LlamaForCausalLM.projections


def assemble(
    args: LlamaArgs,
    tensors: dict[str, torch.Tensor],
    formats: dict[str, str],
    dtype: torch.dtype,
    device: torch.device,
    model_class: type[LlamaForCausalLM] = LlamaForCausalLM,
    layers: bool = True,
) -> LlamaForCausalLM:
    """Build the model on the meta device and move `tensors` (kiln names, consumed) into place.

    formats maps each projection kind (model_class.projections and "lm_head") to its stored weight
    format (engines/torch/layers/formats.py); missing kinds are dense. A tied LM head in dense format
    shares the embedding tensor. model_class: a variant of LlamaForCausalLM (another projection layout).
    layers=False: the embeddings, final norm and LM head only; the decoder layers stay on the meta device until
    load_layer puts each in place (the build's layer-by-layer pass, engines/build/stream.py).
    """
    from engines.torch.layers.formats import make_linear

    with torch.device("meta"):
        model = model_class(args)
    dispatch = LinearDispatch(dtype, device)

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"Weights lack tensor {name!r}.")
        return tensors.pop(name)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)

    model.embed_tokens.weight = param(take("embed_tokens.weight"))
    model.norm = param(take("norm.weight"))
    for i in range(args.num_layers if layers else 0):
        model.load_layer(i, tensors, formats, dispatch, dtype, device)
    head_format = formats.get("lm_head", "dense")
    if args.tie_word_embeddings and head_format == "dense":
        model.lm_head = DenseLinear(model.embed_tokens.weight, None, dispatch)
    else:
        if args.tie_word_embeddings and head_format != "dense" and "lm_head.weight" in tensors:
            raise ValueError("A tied LM head is stored quantized, not as lm_head.weight.")
        model.lm_head = make_linear(head_format, tensors, "lm_head", dispatch, dtype, device)
    if tensors:
        raise ValueError(f"Weights have tensors kiln does not know how to use: {sorted(tensors)[:5]}")
    return model.eval()


def param_count(args: LlamaArgs) -> int:
    o_bias = args.num_layers * args.hidden_size if args.o_bias else 0
    return o_bias + decoder_param_count(
        hidden=args.hidden_size,
        layers=args.num_layers,
        heads=args.num_heads,
        kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        intermediate=args.intermediate_size,
        vocab=args.vocab_size,
        tied_embeddings=args.tie_word_embeddings,
        qkv_bias=args.qkv_bias,
    )


def up_rows(args: LlamaArgs) -> slice:
    return slice(args.intermediate_size, None)  # gate_up is [gate; up]: down_proj reads silu(gate) * up


def v_rows(args: LlamaArgs) -> slice | None:
    # o_proj channel j reads v channel j only when every query head has its own KV head
    if args.num_heads != args.num_kv_heads:
        return None
    return slice((args.num_heads + args.num_kv_heads) * args.head_dim, None)


TOPOLOGY = QuantTopology(
    norm_groups=(NormGroup("input_norm", ("qkv_proj",)), NormGroup("post_norm", ("gate_up_proj",))),
    # down before o: the order the scale searches have always run in. SmoothQuant leaves o_proj alone
    # (attention output has few outlier channels).
    row_folds=(
        RowFold("down_proj", "gate_up_proj", up_rows, reciprocal=True),
        RowFold("o_proj", "qkv_proj", v_rows, smooth=False),
    ),
)


LLAMA = Architecture(
    model_type="llama",
    args_from_config=LlamaArgs.from_hf_config,
    model_class=LlamaForCausalLM,
    read_checkpoint=read_hf_checkpoint,
    assemble=assemble,
    topology=TOPOLOGY,
    param_count=param_count,
)
MISTRAL = replace(LLAMA, model_type="mistral")
QWEN2 = replace(LLAMA, model_type="qwen2", args_from_config=qwen2_args)
