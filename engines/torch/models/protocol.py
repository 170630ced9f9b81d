"""What the engine, the loader and the build need from a model, so that they type against these and not
against one architecture's classes. An architecture's model (engines/torch/models/registry.py) provides them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engines.torch.attention import AttentionMetadata


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
