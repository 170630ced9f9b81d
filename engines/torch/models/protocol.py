"""What the engine, the loader and the build need from a model, so that they type against these and not
against one architecture's classes. An architecture's model (engines/torch/models/registry.py) provides them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch
    from torch import nn

    from engines.torch.attention import AttentionMetadata
    from engines.torch.layers.linear import LinearDispatch


class ModelArgs(Protocol):
    """The geometry the KV cache, the scheduler and the registry lookup read."""

    @property
    def model_type(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...


class CausalLM(Protocol):
    """A decoder over a paged KV cache. Tokens of a step arrive flattened ([T]) with their positions."""

    # per layer, the names of its projection modules (any [T, K] -> [T, N] module): calibration records
    # their inputs, quantization replaces their weights
    projections: tuple[str, ...]
    # which attention kernels can run it (attention_backend.select_attention_backend): rope_kv's fused RoPE and
    # cache write; whether some layers soft-cap their attention (decode rows on the torch path)
    fused_rope: bool
    capped_attention: bool

    @property
    def args(self) -> ModelArgs: ...
    @property
    def layers(self) -> nn.ModuleList: ...
    @property
    def cos(self) -> torch.Tensor | None: ...  # the RoPE table init_rope built (its dtype is the compute dtype)

    def init_rope(self, max_positions: int, dtype: torch.dtype, device: torch.device | str) -> None: ...

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list
    ) -> torch.Tensor: ...  # -> hidden states [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [N, hidden] -> [N, vocab] float32

    # One layer at a time, as the build runs a model it never holds whole (engines/build/stream.py): the residual
    # stream from the tokens, a layer's input from the residual stream, one layer forward, and a layer's weights
    # loaded into (and freed from) a model assembled with layers=False.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [T] -> residual stream [T, hidden]
    def layer_input(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor: ...
    def decoder_layer(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        h: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        next_layer: nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...  # (residual, next layer's input; after the last: the output)
    def load_layer(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        formats: Mapping[str, str],
        dispatch: LinearDispatch,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None: ...
    def unload_layer(self, index: int) -> None: ...
