"""What a model architecture provides to kiln: one registry entry (engines/torch/models/registry.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from engines.torch.models.protocol import CausalLM, ModelArgs
from engines.torch.models.topology import QuantTopology

A = TypeVar("A", bound=ModelArgs)


@dataclass(frozen=True)
class CheckpointPart:
    """Which tensors a checkpoint reader returns: those of the decoder layers `layers` and, with `outer`, the rest
    (embeddings, final norm, LM head). The build reads a model one part at a time (engines/build/stream.py)."""

    layers: tuple[int, ...] = ()
    outer: bool = False

    @classmethod
    def layer(cls, index: int) -> CheckpointPart:
        return cls(layers=(index,))


OUTER = CheckpointPart(outer=True)


class CheckpointReader(Protocol):
    def __call__(
        self, folder: Path, args: Any, dtype: torch.dtype, device: torch.device, *, part: CheckpointPart | None = None
    ) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors under kiln's names, cast to `dtype`: those of `part`, or with None all of them
        (and then a tensor the architecture does not use is an error)."""
        ...


class Assembler(Protocol):
    def __call__(
        self,
        args: Any,
        tensors: dict[str, torch.Tensor],
        formats: dict[str, str],
        dtype: torch.dtype,
        device: torch.device,
        layers: bool = True,
    ) -> CausalLM:
        """The model from `tensors` (kiln names, consumed), each projection kind in its stored format; with
        layers=False only its embeddings, final norm and LM head, its decoder layers left for CausalLM.load_layer."""
        ...


@dataclass(frozen=True)
class Architecture(Generic[A]):
    model_type: str  # the Hugging Face config's model_type this entry serves
    args_from_config: Callable[[Any], A]  # Hugging Face config -> kiln's args (the family's quirks go here)
    model_class: type[CausalLM]  # its class attribute `projections` names each layer's projections
    # checkpoint folder -> its tensors under kiln's names (the names assemble and quantization use), all or one
    # part; GGUF files reach it already converted to a Hugging Face folder (engines/model_source.py)
    read_checkpoint: CheckpointReader
    assemble: Assembler
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
