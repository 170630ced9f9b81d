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
    # how activation scales fold into producers (SmoothQuant, AWQ); a family whose layers depend on its config (a
    # mixture of experts: a projection pair per expert) gives it per args
    topology: QuantTopology | Callable[[A], QuantTopology]
    param_count: Callable[[A], int]
    # each layer's projections per args, for such a family (its model sets them per instance); None: the class's
    projections_of: Callable[[A], tuple[str, ...]] | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        return self.model_class.projections

    def layer_projections(self, args: A) -> tuple[str, ...]:
        """The projections of every layer of the model `args` describe (what calibration and the build walk)."""
        return self.model_class.projections if self.projections_of is None else self.projections_of(args)

    def topology_for(self, args: A) -> QuantTopology:
        return self.topology if isinstance(self.topology, QuantTopology) else self.topology(args)
