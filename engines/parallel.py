"""How a model is split across GPUs: tensor parallel x pipeline parallel ranks, one GPU each.

Only TensorRT-LLM engines are split. `kiln build --backend trtllm --tensor-parallel-size T --pipeline-parallel-size P`
hands the sizes to TensorRT-LLM's LLM (llmapi/llm_args.py BaseLlmArgs.tensor_parallel_size/pipeline_parallel_size;
llmapi/llm_utils.py ModelLoader builds one engine per rank from `parallel_config.to_mapping()`, BuildConfig has no
mapping of its own), engine.json records them (TrtllmBuild), and `kiln serve` drives that MPI world from its one
process: llmapi/llm.py BaseLLM.__init__ spawns T x P workers through MpiPoolSession (mpi4py's MPIPoolExecutor, no
mpirun), as trtllm-serve does. kiln's torch engine runs on one device and refuses a split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engines.hardware import Hardware

if TYPE_CHECKING:
    from engines.build.manifest import TrtllmBuild

TORCH_REFUSAL = (
    "--tensor-parallel-size and --pipeline-parallel-size split a model across GPUs with --backend trtllm only; "
    "kiln's torch engine runs on one device."
)


class SplitError(ValueError):
    """A split that cannot be built or served here; the message is one sentence."""


@dataclass(frozen=True)
class GpuSplit:
    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        for flag, value in (("--tensor-parallel-size", self.tensor), ("--pipeline-parallel-size", self.pipeline)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SplitError(f"{flag} must be a whole number of at least 1, got {value!r}.")

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline

    @property
    def is_split(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        gpus = "1 GPU" if self.world_size == 1 else f"{self.world_size} GPUs"
        return f"{gpus} (tensor parallel {self.tensor} x pipeline parallel {self.pipeline})"

    def llm_kwargs(self) -> dict[str, int]:
        """The LLM arguments of this split; none for one GPU, TensorRT-LLM's default."""
        if not self.is_split:
            return {}
        return {"tensor_parallel_size": self.tensor, "pipeline_parallel_size": self.pipeline}


ONE_GPU = GpuSplit()


def check_gpus(split: GpuSplit, hardware: Hardware, doing: str) -> None:
    """Refuse a split wider than this machine, before any GPU work: TensorRT-LLM would raise "Only N GPUs are
    available, but M are required." (llmapi/llm.py BaseLLM.__init__) only once it starts."""
    if hardware.device == "cuda" and hardware.count < split.world_size:
        raise SplitError(
            f"{doing} needs {split.describe()} and this machine has {hardware.count} "
            f"({hardware.name}); give the container more GPUs (compose: KILN_GPUS) or a smaller split."
        )


def check_serve_split(engine: GpuSplit, tensor: int | None, pipeline: int | None) -> None:
    """`kiln serve --tensor-parallel-size/--pipeline-parallel-size` may only confirm the engine's split: a TensorRT
    engine is compiled per rank, so it runs with the mapping it was built with."""
    asked = GpuSplit(tensor or engine.tensor, pipeline or engine.pipeline)
    if asked != engine:
        raise SplitError(
            f"This engine was built for {engine.describe()} and cannot be served as {asked.describe()}; "
            "rebuild it with `kiln build --backend trtllm` at that split, or leave the sizes unset."
        )


def serve_split(built: TrtllmBuild | None, tensor: int | None, pipeline: int | None, hardware: Hardware) -> GpuSplit:
    """The split engine.json records (TrtllmBuild), which `kiln serve` may only confirm, on enough GPUs."""
    split = GpuSplit(built.tensor_parallel_size, built.pipeline_parallel_size) if built else GpuSplit()
    check_serve_split(split, tensor, pipeline)
    check_gpus(split, hardware, "This engine")
    return split
