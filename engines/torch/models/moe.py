"""Sparse mixture-of-experts decoders: Mixtral (Llama's attention) and Qwen3-MoE (Qwen3's, with q/k norms). The
MLP of every layer is a router (a float linear layer) choosing, per token, the top k of num_experts SwiGLU experts
by softmax probability; the token's output is the sum of the chosen experts' outputs weighted by their
probabilities, renormalised over the k (Mixtral always; Qwen3-MoE when norm_topk_prob says so).

The routing is transformers' own arithmetic (MixtralTopKRouter, Qwen3MoeTopKRouter): the logits in the model
dtype, softmax in float32, torch.topk on those probabilities (so equal probabilities break as they do there), the
weights left in float32 (Mixtral) or cast back to the model dtype (Qwen3-MoE) before they multiply an expert's
output. transformers adds the experts' weighted outputs into a zero tensor expert by expert in ascending order
(MixtralExperts.forward); moe_mlp adds them in that order too, so float32 sums round alike.

Each expert is two ordinary kiln projections, `expert{e}_gate_up_proj` ([gate; up]) and `expert{e}_down_proj`,
so `kiln build` and load-time quantization store and serve them in any weight format, and the calibration pass
records each expert's input only from the tokens routed to it (moe_mlp calls an expert on exactly those rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.kernels.silu_mul import silu_mul
from engines.torch.models import llama, qwen3
from engines.torch.models.architecture import Architecture, CheckpointPart
from engines.torch.models.llama import LlamaArgs, LlamaForCausalLM
from engines.torch.models.qwen3 import Qwen3ForCausalLM
from engines.torch.models.topology import NormGroup, QuantTopology, RowFold


@dataclass
class MoeArgs(LlamaArgs):
    # intermediate_size (LlamaArgs) is each expert's
    num_experts: int = 0
    experts_per_token: int = 0
    normalize_top_k: bool = True  # renormalise the chosen k probabilities to sum to one
    weights_in_float32: bool = True  # the routing weights multiply in float32 (Mixtral) or the model dtype


def mixtral_args(config: Any) -> MoeArgs:
    base = LlamaArgs.from_hf_config(config)
    return MoeArgs(**vars(base), num_experts=config.num_local_experts, experts_per_token=config.num_experts_per_tok)


def qwen3_moe_args(config: Any) -> MoeArgs:
    dense = sorted(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1)
    if dense or step != 1:
        raise ValueError(
            f"Qwen3-MoE with dense MLP layers (mlp_only_layers {dense}, decoder_sparse_step {step}) is not "
            "supported; kiln serves it with every layer sparse (mlp_only_layers [] and decoder_sparse_step 1)."
        )
    base = dataclasses.replace(LlamaArgs.from_hf_config(config), intermediate_size=config.moe_intermediate_size)
    return MoeArgs(
        **vars(base),
        num_experts=config.num_experts,
        experts_per_token=config.num_experts_per_tok,
        normalize_top_k=bool(config.norm_topk_prob),
        weights_in_float32=False,  # Qwen3MoeTopKRouter casts them to the logits' dtype
    )


def expert_projections(num_experts: int) -> tuple[tuple[str, str], ...]:
    """Per expert, its (gate_up, down) projection names."""
    return tuple((f"expert{e}_gate_up_proj", f"expert{e}_down_proj") for e in range(num_experts))


def layer_projections(args: MoeArgs) -> tuple[str, ...]:
    return ("qkv_proj", "o_proj", *(kind for pair in expert_projections(args.num_experts) for kind in pair))


class SparseMoeForCausalLM(LlamaForCausalLM):
    """Llama's decoder with a sparse MoE block as its MLP (Mixtral); Qwen3MoeForCausalLM adds Qwen3's attention."""

    args: MoeArgs

    def __init__(self, args: MoeArgs):
        super().__init__(args)
        self.projections = layer_projections(args)
        self.experts = expert_projections(args.num_experts)
        for layer in self.layers:
            # the router stays in float (never quantized): it is small, and a rounded logit can flip a routing choice
            layer.router = nn.Parameter(torch.empty(args.num_experts, args.hidden_size), requires_grad=False)

    def load_layer(self, index: int, tensors, formats, dispatch, dtype, device) -> None:
        """Llama's, plus the layer's router (kept in float: the reader returns it as the `router` tensor)."""
        name = f"layers.{index}.router.weight"
        if name not in tensors:
            raise KeyError(f"Weights lack tensor {name!r}.")
        router = tensors.pop(name)
        super().load_layer(index, tensors, formats, dispatch, dtype, device)
        self.layers[index].router = nn.Parameter(router.to(device=device, dtype=dtype), requires_grad=False)

    def unload_layer(self, index: int) -> None:
        super().unload_layer(index)
        args = self.args
        self.layers[index].router = nn.Parameter(
            torch.empty(args.num_experts, args.hidden_size, device="meta"), requires_grad=False
        )

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return moe_mlp(h, layer, self.experts, self.args)


class Qwen3MoeForCausalLM(SparseMoeForCausalLM, Qwen3ForCausalLM):
    """Qwen3's q/k norms (Qwen3ForCausalLM.qkv and layer_norms) with the sparse MoE block."""


def route(logits: torch.Tensor, args: MoeArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, experts] -> (weights, experts) [T, k], as transformers' routers compute them."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, args.experts_per_token, dim=-1)  # transformers' call: its tie-breaking
    if args.normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if args.weights_in_float32 else weights.to(logits.dtype)), experts


def moe_mlp(
    h: torch.Tensor, layer: nn.Module, experts: tuple[tuple[str, str], ...], args: MoeArgs
) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
    """The sparse MoE block. The T * k (token, expert) assignments are sorted by expert, so each chosen expert runs
    once on the block of rows routed to it (one decode row or a whole prefill alike) and its weighted output is
    added back to those rows; experts no token chose are skipped."""
    k = args.experts_per_token
    router: torch.Tensor = layer.router  # type: ignore[assignment]
    weights, chosen = route(F.linear(h, router), args)
    order = torch.argsort(chosen.flatten(), stable=True)  # assignments grouped by expert, tokens in order
    tokens = order // k
    sorted_weights = weights.flatten()[order].unsqueeze(1)
    counts = torch.bincount(chosen.flatten(), minlength=args.num_experts).tolist()  # one host sync per layer
    out = torch.zeros_like(h)
    start = 0
    for (gate_up, down), n in zip(experts, counts):  # ascending expert order: transformers' order of addition
        if n == 0:
            continue
        rows = tokens[start : start + n]
        y = getattr(layer, down)(silu_mul(getattr(layer, gate_up)(h[rows])))
        out.index_add_(0, rows, (y * sorted_weights[start : start + n]).to(out.dtype))
        start += n
    return out


MIXTRAL_BLOCK = "block_sparse_moe"  # Mixtral's checkpoint names: gate (the router), experts.{e}.w1 / w3 / w2
QWEN3_MOE_BLOCK = "mlp"  # Qwen3-MoE's: gate, experts.{e}.gate_proj / up_proj / down_proj


def checkpoint_projections(args: MoeArgs, block: str, gate: str, up: str, down: str) -> dict[str, tuple[str, ...]]:
    """kiln projection -> the checkpoint modules it fuses. Checkpoints keep one module per expert on disk (what
    transformers' save_pretrained writes, although its modules hold the experts as 3D tensors)."""
    out = {kind: llama.LLAMA_PROJECTIONS[kind] for kind in ("qkv_proj", "o_proj")}
    for e, (gate_up_kind, down_kind) in enumerate(expert_projections(args.num_experts)):
        out[gate_up_kind] = (f"{block}.experts.{e}.{gate}", f"{block}.experts.{e}.{up}")
        out[down_kind] = (f"{block}.experts.{e}.{down}",)
    return out


def read_checkpoint(
    folder: Path,
    args: MoeArgs,
    dtype: torch.dtype,
    device: torch.device,
    *,
    block: str,
    names: tuple[str, str, str],
    norms: dict[str, str],
    linear: llama.LinearReader | None = None,
    part: CheckpointPart | None = None,
) -> dict[str, torch.Tensor]:
    """Llama's reader with one projection pair per expert; the router is read as the layer's `router` tensor, in
    float whatever `linear` (a pre-quantized checkpoint's reader, as llama.read_hf_checkpoint's) does. part: as
    llama.read_hf_checkpoint's."""
    return llama.read_hf_checkpoint(
        folder,
        args,
        dtype,
        device,
        norms=norms | {"router": f"{block}.gate"},
        linear=linear,
        projections=checkpoint_projections(args, block, *names),
        part=part,
    )


def assemble(
    args: MoeArgs,
    tensors: dict[str, torch.Tensor],
    formats: dict[str, str],
    dtype: torch.dtype,
    device: torch.device,
    model_class: type[SparseMoeForCausalLM] = SparseMoeForCausalLM,
    layers: bool = True,
) -> SparseMoeForCausalLM:
    """llama.assemble with this family's model class (its load_layer places each layer's router)."""
    return llama.assemble(args, tensors, formats, dtype, device, model_class=model_class, layers=layers)  # type: ignore[return-value]


def param_count(args: MoeArgs) -> int:
    """Every parameter: each expert's, and the routers (a token runs only active_param_count of them)."""
    per_expert = 3 * args.hidden_size * args.intermediate_size
    routers = args.num_experts * args.hidden_size
    head_norms = 2 * args.head_dim if args.model_type == "qwen3_moe" else 0
    return llama.param_count(args) + args.num_layers * ((args.num_experts - 1) * per_expert + routers + head_norms)


def active_param_count(args: MoeArgs) -> int:
    """The parameters one token's forward pass reads: its k experts' of each layer, not all of them."""
    unused = args.num_experts - args.experts_per_token
    return param_count(args) - args.num_layers * unused * 3 * args.hidden_size * args.intermediate_size


def topology(args: MoeArgs) -> QuantTopology:
    """The attention's folds as Llama's. Every expert's gate_up reads the post-attention norm's output, but each
    has its own statistics (those of the tokens routed to it): one per-channel scale folded into the shared norm
    would serve no expert's, and would change the router's input too. So gate_up is unfolded (SmoothQuant leaves
    it unsmoothed, AWQ searches its clip); each expert's down_proj reads its own silu(gate) * up and folds into its
    `up` rows exactly, as Llama's does."""
    experts = expert_projections(args.num_experts)
    return QuantTopology(
        norm_groups=(NormGroup("input_norm", ("qkv_proj",)),),
        row_folds=(
            *(RowFold(down, gate_up, llama.up_rows, reciprocal=True) for gate_up, down in experts),
            RowFold("o_proj", "qkv_proj", llama.v_rows, smooth=False),
        ),
        unfolded=tuple(gate_up for gate_up, _ in experts),
    )


MIXTRAL: Architecture[MoeArgs] = Architecture(
    model_type="mixtral",
    args_from_config=mixtral_args,
    model_class=SparseMoeForCausalLM,
    read_checkpoint=partial(read_checkpoint, block=MIXTRAL_BLOCK, names=("w1", "w3", "w2"), norms=llama.LLAMA_NORMS),
    assemble=assemble,
    topology=topology,
    param_count=param_count,
    projections_of=layer_projections,
)
QWEN3_MOE = dataclasses.replace(
    MIXTRAL,
    model_type="qwen3_moe",
    args_from_config=qwen3_moe_args,
    model_class=Qwen3MoeForCausalLM,
    read_checkpoint=partial(
        read_checkpoint, block=QWEN3_MOE_BLOCK, names=("gate_proj", "up_proj", "down_proj"), norms=qwen3.QWEN3_NORMS
    ),
    assemble=partial(assemble, model_class=Qwen3MoeForCausalLM),
)
