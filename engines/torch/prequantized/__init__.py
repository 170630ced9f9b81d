"""Checkpoints already quantized by another tool (config.json's quantization_config), loaded straight into kiln's
runtime formats: the stored codes, scales and zero points become kiln's int4, int8 or fp8 layers without a float
copy of the model and without quantizing anything again. Modules the tool left in float (embeddings, norms, usually
the LM head) stay dense in the serving dtype.

One reader per quant_method (gptq.py, awq.py, fp8.py, compressed_tensors.py) decodes one checkpoint module into a
weights.StoredWeight; the architecture's checkpoint reader (llama.read_hf_checkpoint's `linear`) asks for the modules
each kiln projection fuses, and FusedLinearReader joins their rows (each with its own scales and zeros) and notes the
format of each projection kind for assemble.

What else a checkpoint stores next to the weights: KV-cache scales (kv_scales.py) are kept for a quantized KV cache;
static activation scales (input_scale, with input_zero_point when asymmetric) are taken, checked and not applied,
since kiln's quantized layers take float activations (or, Fp8Linear on CUDA, quantize them per step).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.prequantized.awq import AwqReader
from engines.torch.prequantized.compressed_tensors import CompressedTensorsReader
from engines.torch.prequantized.config import QuantConfigError
from engines.torch.prequantized.fp8 import Fp8Reader
from engines.torch.prequantized.gptq import GptqReader
from engines.torch.prequantized.kv_scales import KvScaleReader, checkpoint_kv_dtype
from engines.torch.prequantized.weights import fuse

log = logging.getLogger("kiln.engine")

READERS = {"gptq": GptqReader, "awq": AwqReader, "fp8": Fp8Reader, "compressed-tensors": CompressedTensorsReader}


def quantization_config(hf_config) -> dict | None:
    """config.json's quantization_config (a dict; transformers keeps it as read), None for a float checkpoint."""
    config = getattr(hf_config, "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    return config or None


def quant_method(hf_config) -> str | None:
    config = quantization_config(hf_config)
    return None if config is None else str(config.get("quant_method"))


def check_requested(quantization: str, method: str) -> None:
    """A pre-quantized folder is served in its stored format: a load-time scheme on top is refused."""
    if quantization != "auto":
        raise ValueError(
            f"this model folder is already quantized ({method}, config.json's quantization_config) and is served as "
            f"stored; --quantization {quantization} applies to float checkpoints, so leave it at auto."
        )


class FusedLinearReader:
    """llama.LinearReader over one format's reader; `formats` collects each projection kind's kiln format, `kv` the
    KV-cache scales of the attention modules it reads, `activation_scales` how many static input scales it set aside."""

    def __init__(self, reader, dtype: torch.dtype, kv: KvScaleReader):
        self.reader, self.dtype, self.kv = reader, dtype, kv
        self.formats: dict[str, str] = {}
        self.activation_scales = 0

    def __call__(self, ckpt: CheckpointTensors, modules: Sequence[str], prefix: str) -> dict[str, torch.Tensor]:
        for module in modules:
            self._take_activation_scales(ckpt, module)
            self.kv.take(ckpt, module)
        stored = fuse([self.reader.read(ckpt, module, self.dtype) for module in modules], prefix)
        kind = prefix.rsplit(".", 1)[-1]
        known = self.formats.setdefault(kind, stored.format)
        if known != stored.format:
            raise ValueError(
                f"{prefix} is stored as {stored.format} but an earlier layer's {kind} as {known}; kiln serves one "
                "format per projection kind."
            )
        return stored.encode(prefix, self.dtype)

    def _take_activation_scales(self, ckpt: CheckpointTensors, module: str) -> None:
        for field in ("input_scale", "input_zero_point"):  # static, per tensor (activation_scheme "static")
            tensor = ckpt.take_optional(f"{module}.{field}")
            if tensor is None:
                continue
            if tensor.numel() != 1:
                raise ValueError(
                    f"{module}.{field} has shape {list(tensor.shape)}; a static activation scale is one per tensor "
                    "([] or [1])."
                )
            self.activation_scales += field == "input_scale"


@dataclass
class StoredCheckpoint:
    """A pre-quantized checkpoint read into kiln's stored formats, before any module is built."""

    method: str  # quantization_config.quant_method
    args: object  # the architecture's args
    tensors: dict[str, torch.Tensor]  # kiln names -> stored tensors (engines/torch/layers/formats.py)
    formats: dict[str, str]  # projection kind (and "lm_head") -> stored format
    kv_scales: torch.Tensor | None  # [layers, 2, kv_heads] float32 from the checkpoint, for `kv_dtype`
    kv_dtype: str  # the KV dtype those scales were computed for


def read_prequantized(folder: Path, hf_config, dtype: torch.dtype, device: torch.device) -> StoredCheckpoint:
    """The pre-quantized checkpoint in `folder` in kiln's stored formats (dense tensors in `dtype`)."""
    from engines.torch.models.registry import architecture

    config = quantization_config(hf_config) or {}
    method = config.get("quant_method")
    if method not in READERS:
        raise QuantConfigError(
            f"quantization_config.quant_method {method!r} is not one kiln loads; it reads {', '.join(READERS)}."
        )
    reader = READERS[method](config)
    arch = architecture(hf_config.model_type)
    if "linear" not in inspect.signature(arch.read_checkpoint).parameters:
        raise ValueError(f"kiln reads pre-quantized checkpoints of Llama-family models, not of {arch.model_type}.")
    args = arch.args_from_config(hf_config)
    linear = FusedLinearReader(reader, dtype, KvScaleReader(args.num_layers, args.num_kv_heads))
    tensors = arch.read_checkpoint(folder, args, dtype, device, linear=linear)  # type: ignore[call-arg]
    log.info("serving the %s checkpoint's stored weights: %s", method, linear.formats)
    if linear.activation_scales:
        log.info(
            "the checkpoint's %d static activation scales (input_scale) are not applied: kiln runs its quantized "
            "weights with float activations (FP8 weights on CUDA quantize them per step)",
            linear.activation_scales,
        )
    kv_scales = linear.kv.scales()
    kv_dtype = checkpoint_kv_dtype(config)
    if kv_scales is not None:
        log.info("the checkpoint carries %s KV-cache scales; a quantized KV cache uses them", kv_dtype)
    return StoredCheckpoint(str(method), args, tensors, linear.formats, kv_scales, kv_dtype)


def load_prequantized(folder: Path, hf_config, dtype: torch.dtype, device: torch.device):
    """The pre-quantized checkpoint in `folder` as a model of its architecture in kiln's runtime formats, and the
    checkpoint as read (its KV-cache scales)."""
    from engines.torch.models.registry import architecture

    stored = read_prequantized(folder, hf_config, dtype, device)
    arch = architecture(hf_config.model_type)
    return arch.assemble(stored.args, stored.tensors, stored.formats, dtype, device), stored
