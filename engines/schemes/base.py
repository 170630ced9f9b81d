"""What a quantization scheme (a `--precision` name) is: one object that says everything kiln needs to
know about a precision, so that no other module branches on its name.

A scheme names the stored weight format of its projections and LM head (engines/torch/layers/formats.py,
where each format's runtime layer is made), the KV dtype its profiles pair it with, the calibration
statistics its build needs, its bytes per parameter, the GPUs it needs (kiln's torch CUDA path and
TensorRT-LLM separately: their kernels differ) and how it quantizes one decoder layer. Schemes are
registered by name in engines/schemes/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # torch is imported only where a scheme quantizes: `kiln profiles` and `kiln plan` stay light
    import torch

    from engines.build.calibrate import ProjectionStats
    from engines.build.quantize import LayerWeights
    from engines.torch.layers.formats import WeightFormat

# The statistics a calibration pass can collect for a scheme (engines/build/calibrate.py Needs):
# input-row samples (AWQ), Hessians (GPTQ), per-channel input max |x| (SmoothQuant).
CALIBRATION_STATISTICS = ("samples", "hessian", "channel_amax")


@dataclass(frozen=True)
class TrtllmMapping:
    """How TensorRT-LLM builds a scheme: its QuantAlgo member (tensorrt_llm/quantization/mode.py; None: no
    weight quantization), the SM its kernels need (docs/source/reference/support-matrix.md), whether the
    algorithm runs calibration data, and further QuantConfig fields."""

    quant_algo: str | None
    min_sm: int
    calibrated: bool = False
    grouped: bool = False  # QuantConfig takes --group-size
    quant_config: Mapping[str, object] = field(default_factory=dict)


@dataclass
class LayerResult:
    """One projection as it goes into weights.safetensors: its tensors under their full names (with the
    bias), and the int4 group size it used, if any."""

    tensors: dict[str, torch.Tensor]
    group_size: int | None = None


@dataclass
class QuantizeContext:
    """What a scheme's quantize_layer reads besides the layer: the calibration statistics of a projection
    (by full name, e.g. "layers.3.down_proj"), the requested int4 group size, the dtype the dense tensors are
    stored in, and a place to collect per-layer figures for the build report."""

    stats: Callable[[str], ProjectionStats]
    group_size: int
    store: torch.dtype
    collected: dict[str, list[float]] = field(default_factory=dict)

    def collect(self, key: str, value: float) -> None:
        self.collected.setdefault(key, []).append(value)

    def calibrated(self, name: str) -> bool:
        """Whether any calibration token reached projection `name`. One that none reached (a mixture-of-experts
        expert the router never chose for the calibration prompts) has no statistics: schemes quantize it without
        them (no smoothing, round-to-nearest), and the build report counts it."""
        if self.stats(name).tokens > 0:
            return True
        self.collect("uncalibrated", 1.0)
        return False

    def uncalibrated_details(self) -> dict[str, object]:
        count = len(self.collected.get("uncalibrated", []))
        return {"uncalibrated_projections": count} if count else {}


class Scheme:
    """Base of every scheme; subclasses set the class attributes and, when kiln's torch engine builds
    them, quantize_layer."""

    name: ClassVar[str]
    projection_format: ClassVar[str]  # stored format of every projection (formats.py)
    head_format: ClassVar[str] = "int8"  # of the LM head: int8 per channel costs it little accuracy
    default_kv: ClassVar[str] = "int8"  # the KV dtype its profiles and `kiln plan` pair it with
    calibration: ClassVar[frozenset[str]] = frozenset()  # drawn from CALIBRATION_STATISTICS
    bits_per_weight: ClassVar[float] = 8.0
    grouped: ClassVar[bool] = False  # group-wise scales: takes --group-size / a profile's group_size
    runtime_dtype: ClassVar[str] = "auto"  # the dtype the engine runs in ("float32" for fp32)
    min_sm: ClassVar[int | None] = None  # kiln's torch CUDA kernels
    sm_reason: ClassVar[str] = ""  # what needs that SM, for `kiln profiles`
    trtllm: ClassVar[TrtllmMapping | None] = None  # None: TensorRT-LLM does not build it
    torch_build: ClassVar[bool] = True  # False: only TensorRT-LLM builds it
    family: ClassVar[str]  # what `kiln plan` groups it under: "bf16", "fp8", "int8", "int4"...
    plan_row: ClassVar[bool] = False  # this scheme stands for its family in `kiln plan`'s table
    formats: ClassVar[
        tuple[WeightFormat, ...]
    ] = ()  # stored formats this scheme brings (the built-in ones are in formats.py)

    def bytes_per_param(self, group_size: int) -> float:
        """Stored bytes per weight. Per-channel scales are negligible (one per row); a grouped scheme keeps
        an fp16 scale and a 4-bit zero point per group, 2.5 bytes per `group_size` weights."""
        return self.bits_per_weight / 8 + (2.5 / group_size if self.grouped else 0.0)

    def store_dtype(self) -> torch.dtype:
        import torch

        return torch.float32 if self.runtime_dtype == "float32" else torch.bfloat16

    def quantize_layer(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, LayerResult]:
        """Quantize (and fold scales into) one decoder layer; returns every projection kind's tensors."""
        raise NotImplementedError(f"kiln's torch engine does not build {self.name}")

    def encode_head(self, weight: torch.Tensor, store: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The LM head's tensors, or None to keep it dense (a tied head then reads the embeddings)."""
        if self.head_format == "dense":
            return None
        from engines.quant.rtn import quantize_rtn
        from engines.torch.layers import formats as fmt

        return fmt.encode_int8("lm_head", quantize_rtn(weight.float(), 8), None, store)

    def details(self, ctx: QuantizeContext) -> dict[str, object]:
        """What the build report records about how this scheme ran (e.g. the SmoothQuant alpha)."""
        return {}
