"""Checkpoints already quantized by another tool (config.json's quantization_config), loaded straight into kiln's
runtime formats: the stored codes, scales and zero points become kiln's int4, int8 or fp8 layers without a float
copy of the model and without quantizing anything again. Modules the tool left in float (embeddings, norms, usually
the LM head) stay dense in the serving dtype.

One reader per quant_method (gptq.py, awq.py, fp8.py, compressed_tensors.py) decodes one checkpoint module into a
weights.StoredWeight; the architecture's checkpoint reader (llama.read_hf_checkpoint's `linear`) asks for the modules
each kiln projection fuses, and FusedLinearReader joins their rows (each with its own scales and zeros) and notes the
format of each projection kind for assemble.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from engines.torch.checkpoint_tensors import CheckpointTensors
from engines.torch.prequantized.awq import AwqReader
from engines.torch.prequantized.compressed_tensors import CompressedTensorsReader
from engines.torch.prequantized.config import QuantConfigError
from engines.torch.prequantized.fp8 import Fp8Reader
from engines.torch.prequantized.gptq import GptqReader
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
    """llama.LinearReader over one format's reader; `formats` collects each projection kind's kiln format."""

    def __init__(self, reader, dtype: torch.dtype):
        self.reader, self.dtype = reader, dtype
        self.formats: dict[str, str] = {}

    def __call__(self, ckpt: CheckpointTensors, modules: Sequence[str], prefix: str) -> dict[str, torch.Tensor]:
        stored = fuse([self.reader.read(ckpt, module, self.dtype) for module in modules], prefix)
        kind = prefix.rsplit(".", 1)[-1]
        known = self.formats.setdefault(kind, stored.format)
        if known != stored.format:
            raise ValueError(
                f"{prefix} is stored as {stored.format} but an earlier layer's {kind} as {known}; kiln serves one "
                "format per projection kind."
            )
        return stored.encode(prefix, self.dtype)


def load_prequantized(folder: Path, hf_config, dtype: torch.dtype, device: torch.device):
    """The pre-quantized checkpoint in `folder` as a model of its architecture in kiln's runtime formats."""
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
    linear = FusedLinearReader(reader, dtype)
    tensors = arch.read_checkpoint(folder, args, dtype, device, linear=linear)  # type: ignore[call-arg]
    log.info("serving the %s checkpoint's stored weights: %s", method, linear.formats)
    return arch.assemble(args, tensors, linear.formats, dtype, device)
