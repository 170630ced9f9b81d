"""Weight quantization at load time: a model served with quantized weights without building an engine first.

`kiln serve` with no flags is what most users run, so the default path is what has to be fast. On a CPU a decode
step reads every weight once, and kiln's int kernels keep the activations and the accumulation in floating point
(W8A16 / W4A16) while reading a half (int8) or less of bf16's bytes.

- int8-wo: round-to-nearest per output channel needs no calibration data, so it runs in the load itself (seconds
  for the default model) with the same code and the same result as `kiln build --precision int8-wo`
  (engines/build/quantize.py); the build measures its accuracy (docs/performance.md gives the figures).
- gguf: a GGUF file's projections stored as Q4_1 blocks are served as those blocks (engines/torch/gguf_blocks.py):
  they are the model's weights, exactly, at 5 bits each. What the file keeps otherwise (other block types, and the
  LM head, tied to the embeddings) is int8-wo.

`quantization` (EngineConfig, `--quantization`):
- auto: on a CPU that kiln has int kernels for (any CPU with AVX2+FMA+F16C, after KILN_CPU_ISA) when `--dtype` is
  auto too, int8-wo, or gguf for a GGUF file (the embedded default is one) on an AVX-512 CPU (where the blocks
  decode through 16-entry tables, with AVX512-BF16 dot products for bf16 steps; AVX2 decodes them arithmetically,
  slower than int8); otherwise none. A
  dtype named explicitly asks for dense weights in that dtype: float32 is how kiln's output is compared with
  transformers' token for token. CUDA stays dense: its bf16 tensor-core matmuls are the fast path there, and kiln's
  int kernels are CPU code.
- none: dense weights in the serving dtype.
- int8-wo, gguf: that, whatever the device and dtype (gguf needs a GGUF file).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engines import cpu_isa
from engines.config import EngineConfig
from engines.model_source import gguf_file
from engines.torch import gguf_blocks, host_malloc

log = logging.getLogger("kiln.engine")


def resolve(config: EngineConfig, device: torch.device) -> str | None:
    """The scheme the model's weights are quantized with at load (None: dense)."""
    if config.quantization == "none":
        return None
    if config.quantization == "gguf" and gguf_file(config.model) is None:
        raise ValueError(f"--quantization gguf serves a .gguf file's own blocks; {config.model!r} is not a GGUF file.")
    if config.quantization != "auto":
        return config.quantization
    level = cpu_isa.level_of(cpu_isa.cpu_flags())
    if device.type == "cpu" and config.dtype == "auto" and level is not None:
        # the Q4_1 blocks beat int8 with AVX-512's 16-entry table lookups; AVX2 decodes each weight arithmetically,
        # which cost more than int8's (docs/performance.md: 46 against int8's 74 tok/s at c=1 as avx2)
        return "gguf" if gguf_file(config.model) is not None and level != "avx2" else "int8-wo"
    return None


def load_quantized(
    folder: Path, hf_config, precision: str, dtype: torch.dtype, device: torch.device, gguf: Path | None = None
):
    """The checkpoint in `folder` as a model of its architecture whose projections and LM head are `precision`
    (a scheme that needs no calibration, or gguf: the blocks of the GGUF file `folder` was converted from). The
    dense weights are read in the serving dtype and each layer is quantized from a float32 copy of its own weights,
    so the float32 model never exists whole."""
    from engines.build.quantize import quantize_model
    from engines.torch.models.registry import architecture

    arch = architecture(hf_config.model_type)
    args = arch.args_from_config(hf_config)
    dense = arch.read_checkpoint(folder, args, dtype, device)
    quantized = quantize_model(dense, args, "int8-wo" if precision == "gguf" else precision, None, progress=False)
    tensors, formats = quantized.tensors, dict(quantized.formats)
    if precision == "gguf":
        # the model's own weights wherever it keeps them: the embeddings, norms and biases in the serving dtype
        # (an int8-wo engine stores them as bf16, which a float32 model would feel)
        tensors.update({name: dense[name] for name in tensors.keys() & dense.keys()})
        if gguf is None:
            raise ValueError("--quantization gguf needs the GGUF file the model was converted from.")
        blocks = gguf_blocks.cached_q4_1_projections(gguf, folder, args.num_layers, args.num_heads, args.num_kv_heads)
        kinds = sorted({name.split(".")[2] for name in blocks})
        for kind in kinds:
            for i in range(args.num_layers):
                for field in ("qweight", "scales"):  # int8-wo's tensors; a bias stays
                    tensors.pop(f"layers.{i}.{kind}.{field}")
            formats[kind] = gguf_blocks.FORMAT
        tensors.update(blocks)
        log.info("serving the GGUF file's Q4_1 blocks for %s, int8-wo for the rest", ", ".join(kinds) or "nothing")
    del dense
    host_malloc.release_free()  # the dense copy and the per-layer float32 ones: freed heap, given back now
    log.info("quantized the weights to %s at load (--quantization)", precision)
    return arch.assemble(args, tensors, formats, dtype, device)
