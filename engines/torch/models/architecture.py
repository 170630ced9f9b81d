"""What a model architecture provides to kiln: one registry entry (engines/torch/models/registry.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from engines.torch.models.protocol import CausalLM, ModelArgs
from engines.torch.models.topology import QuantTopology

A = TypeVar("A", bound=ModelArgs)


@dataclass(frozen=True)
class Architecture(Generic[A]):
    model_type: str  # the Hugging Face config's model_type this entry serves
    args_from_config: Callable[[Any], A]  # Hugging Face config -> kiln's args (the family's quirks go here)
    model_class: type[CausalLM]  # its class attribute `projections` names each layer's projections
    # checkpoint folder -> its tensors under kiln's names (the names assemble and quantization use); GGUF
    # files reach it already converted to a Hugging Face folder (engines/model_source.py)
    read_checkpoint: Callable[[Path, A, torch.dtype, torch.device], dict[str, torch.Tensor]]
    # (args, tensors under kiln's names (consumed), weight format per projection kind, dtype, device) -> model
    assemble: Callable[[A, dict[str, torch.Tensor], dict[str, str], torch.dtype, torch.device], CausalLM]
    topology: QuantTopology  # how activation scales fold into producers (SmoothQuant, AWQ)
    param_count: Callable[[A], int]

    @property
    def projections(self) -> tuple[str, ...]:
        return self.model_class.projections
