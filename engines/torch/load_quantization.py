"""Weight quantization at load time: a model folder served as int8 weight-only without building an engine first.

`kiln serve` with no flags is what most users run, so the default path is what has to be fast. On a CPU a decode
step reads every weight once, and int8 weights halve the bytes of bf16 (a quarter of float32's) while kiln's int8
kernels keep the activations and the accumulation in floating point (W8A16). Round-to-nearest per output channel
needs no calibration data, so it runs in the load itself (seconds for the default model) with the same code and
the same result as `kiln build --precision int8-wo` (engines/build/quantize.py); the build measures its accuracy
(docs/performance.md gives the figures).

`quantization` (EngineConfig, `--quantization`):
- auto: int8-wo on a CPU that kiln has int8 kernels for (any CPU with AVX2+FMA+F16C, after KILN_CPU_ISA) when
  `--dtype` is auto too; otherwise none. A dtype named explicitly asks for dense weights in that dtype: float32
  is how kiln's output is compared with transformers' token for token. CUDA stays dense: its bf16 tensor-core
  matmuls are the fast path there, and kiln's int8 kernels are CPU code.
- none: dense weights in the serving dtype.
- int8-wo: int8 weight-only whatever the device and dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engines import cpu_isa
from engines.config import EngineConfig
from engines.torch import host_malloc

log = logging.getLogger("kiln.engine")


def resolve(config: EngineConfig, device: torch.device) -> str | None:
    """The scheme a model folder is quantized with at load (None: dense)."""
    if config.quantization == "none":
        return None
    if config.quantization != "auto":
        return config.quantization
    if device.type == "cpu" and config.dtype == "auto" and cpu_isa.level_of(cpu_isa.cpu_flags()) is not None:
        return "int8-wo"
    return None


def load_quantized(folder: Path, hf_config, precision: str, dtype: torch.dtype, device: torch.device):
    """The checkpoint in `folder` as a model of its architecture whose projections and LM head are `precision`
    (a scheme that needs no calibration). The dense weights are read in the serving dtype and each layer is
    quantized from a float32 copy of its own weights, so the float32 model never exists whole."""
    from engines.build.quantize import quantize_model
    from engines.torch.models.registry import architecture

    arch = architecture(hf_config.model_type)
    args = arch.args_from_config(hf_config)
    dense = arch.read_checkpoint(folder, args, dtype, device)
    quantized = quantize_model(dense, args, precision, None, progress=False)
    del dense
    host_malloc.release_free()  # the dense copy and the per-layer float32 ones: freed heap, given back now
    log.info("quantized the weights to %s at load (--quantization)", precision)
    return arch.assemble(args, quantized.tensors, quantized.formats, dtype, device)
