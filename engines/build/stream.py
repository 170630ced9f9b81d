"""A model the build never holds whole: its checkpoint read one decoder layer at a time, and token sequences run
through it layer by layer.

The checkpoint is read by the architecture's own reader, one part at a time (Architecture.read_checkpoint with a
CheckpointPart): first the outer tensors (embeddings, final norm, LM head), which make a model shell assembled with
layers=False; then each layer, loaded into the shell (CausalLM.load_layer), run and freed (unload_layer) before the
next is read. Sequences travel as their residual streams ([T, hidden] each) through the model's own decoder_layer,
so each layer computes what it computes when served, and a float32 model run this way gives its full forward's
outputs bit for bit. Held at once: the outer tensors, one layer, the sequences' residual streams and one layer's
KV cache for the longest sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from engines.torch.layers.linear import LinearDispatch
from engines.torch.model_runner import KVCache
from engines.torch.models.architecture import OUTER, Architecture, CheckpointPart
from engines.torch.models.protocol import CausalLM
from engines.torch.sequence_runner import prefill_metadata

FP32 = torch.float32


@dataclass
class Checkpoint:
    """A model folder read part by part in float32 (the build's reference precision)."""

    folder: Path
    arch: Architecture[Any]
    args: Any
    device: torch.device

    def outer(self) -> dict[str, torch.Tensor]:
        return self.arch.read_checkpoint(self.folder, self.args, FP32, self.device, part=OUTER)

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return self.arch.read_checkpoint(self.folder, self.args, FP32, self.device, part=CheckpointPart.layer(index))

    def shell(self, outer: dict[str, torch.Tensor], formats: dict[str, str], dtype: torch.dtype) -> CausalLM:
        """The model of `outer` (stored tensors in `formats`, consumed) without its decoder layers."""
        return self.arch.assemble(self.args, outer, formats, dtype, self.device, layers=False)


class LayerRunner:
    """Runs whole sequences, one at a time, through one decoder layer of `model`: each is prefilled into a KV cache of
    that one layer (slots 0..T-1), with the attention code the server runs, a quantized KV cache included."""

    def __init__(self, model: CausalLM, dtype: torch.dtype, device: torch.device, max_tokens: int):
        self.model, self.dtype, self.device = model, dtype, device
        self.block_size = 16
        self.num_blocks = -(-max_tokens // self.block_size)
        model.init_rope(max_tokens, dtype, device)
        self.use_kv_cache("model", None)

    def use_kv_cache(self, kv_cache_dtype: str, scales: torch.Tensor | None) -> None:
        """The KV cache the next layer runs with: its dtype and, quantized, that layer's scales [2, kv_heads]."""
        a = self.model.args
        self.kv_cache = KVCache(
            1,
            self.num_blocks,
            self.block_size,
            a.num_kv_heads,
            a.head_dim,
            self.dtype,
            self.device,
            kv_cache_dtype,
            None if scales is None else scales[None],
        )

    def load(self, index: int, tensors: dict[str, torch.Tensor], formats: dict[str, str]) -> nn.Module:
        """Layer `index` of the model from its stored tensors (consumed); returns the layer."""
        load_layer(self.model, index, tensors, formats, self.dtype, self.device)
        return self.model.layers[index]

    @torch.inference_mode()
    def forward(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream [T, hidden] before `layer` -> (the residual stream after it, the model's output were it
        the last layer: the final norm of that)."""
        positions, meta = prefill_metadata(x.shape[0], self.block_size, self.device)
        rope = (self.model.cos[positions].unsqueeze(1), self.model.sin[positions].unsqueeze(1))
        x = x.to(self.dtype)
        h = self.model.layer_input(layer, x)
        return self.model.decoder_layer(layer, x, h, positions, rope, self.kv_cache.layers[0], meta, None)

    def kv_values(self, num_tokens: int) -> torch.Tensor:
        """The last sequence's keys and values in the (unquantized) cache: [2, kv_heads, num_tokens, head_dim]."""
        return self.kv_cache.data[0].flatten(2, 3)[:, :, :num_tokens]


def load_layer(
    model: CausalLM,
    index: int,
    tensors: dict[str, torch.Tensor],
    formats: dict[str, str],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Layer `index` of a model assembled without its layers, from its stored tensors (consumed, all of them)."""
    model.load_layer(index, tensors, formats, LinearDispatch(dtype, device), dtype, device)
    if tensors:
        raise ValueError(f"Layer {index} has tensors kiln does not know how to use: {sorted(tensors)[:5]}")


def embed(model: CausalLM, sequences: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Each sequence's residual stream before the first layer."""
    with torch.inference_mode():
        return [model.embed(torch.tensor(ids, dtype=torch.long, device=device)) for ids in sequences]


def float_outputs(
    checkpoint: Checkpoint, shell: CausalLM, sequences: list[list[int]], rows: list[slice], progress: bool = False
) -> list[torch.Tensor]:
    """The float32 model's output (its final hidden states) at rows[k] of sequence k, computed a layer at a time.
    shell: the checkpoint's float32 shell (Checkpoint.shell of its outer tensors)."""
    runner = LayerRunner(shell, FP32, checkpoint.device, max(len(s) for s in sequences))
    xs = embed(shell, sequences, checkpoint.device)
    outputs: list[torch.Tensor] = []
    layers = range(checkpoint.args.num_layers)
    for i in tqdm(layers, desc="float reference", unit="layer", disable=not progress):
        layer = runner.load(i, checkpoint.layer(i), {})
        last = i == checkpoint.args.num_layers - 1
        for k, x in enumerate(xs):
            xs[k], out = runner.forward(layer, x)
            if last:
                outputs.append(out[rows[k]])
        shell.unload_layer(i)
    return outputs
