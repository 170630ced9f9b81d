"""model_type -> architecture: the one place that knows which model families kiln's torch engine runs.

Adding an architecture = one module (its args, model, checkpoint reader, topology, parameter count; a
family close to Llama reuses engines/torch/models/llama.py's parts) + one entry here."""

from __future__ import annotations

from typing import Any

from engines.torch.models import gemma, llama, moe, olmo2, phi3, qwen3
from engines.torch.models.architecture import Architecture

ARCHITECTURES: dict[str, Architecture[Any]] = {
    arch.model_type: arch
    for arch in (
        llama.LLAMA,
        llama.MISTRAL,
        llama.QWEN2,
        qwen3.QWEN3,
        olmo2.OLMO2,
        gemma.GEMMA2,
        gemma.GEMMA3_TEXT,
        phi3.PHI3,
        moe.MIXTRAL,
        moe.QWEN3_MOE,
    )
}


def architecture(model_type: str) -> Architecture[Any]:
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Model type {model_type!r} is not supported; kiln's torch engine runs {', '.join(ARCHITECTURES)}."
        )
    return ARCHITECTURES[model_type]
