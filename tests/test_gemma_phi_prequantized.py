"""Pre-quantized Gemma 2 and Phi-3 checkpoints (GPTQ 4-bit, tests/prequant_writers.py's AutoGPTQ layout) load
through their architectures' readers (Gemma's norms still become 1 + w; Phi-3's fused qkv_proj and gate_up_proj
are one quantized module each, as in its real checkpoints) and answer as kiln's dense load of the dequantized
weights does (tests/test_prequantized.py's check)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engines.torch.layers.quantized import Int4WeightOnlyLinear
from tests import prequant_writers as writers
from tests.test_prequantized import check_same_answers
from tests.test_qwen3_olmo2_build import save_tiny_chat_model

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": True, "desc_act": False}


def _write(folder: Path, source: Path, tensors, quantization_config: dict | None) -> Path:
    shutil.copytree(source, folder)
    save_file(tensors, str(folder / "model.safetensors"))
    if quantization_config is not None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quantization_config}))
    return folder


@pytest.mark.parametrize("model_type", ["gemma2", "phi3"])
def test_gptq_checkpoint_answers_as_its_dequantized_weights(model_type, tmp_path):
    source = tmp_path / "float"
    save_tiny_chat_model(model_type, source)
    stored, reference = {}, {}
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            fields, dequantized = writers.gptq_linear(tensor.float(), 4, 16, True, None, True)
            stored |= {f"{module}.{field}": t.contiguous() for field, t in fields.items()}
            reference[name] = dequantized.contiguous()
        else:
            stored[name] = reference[name] = tensor
    quantized = _write(tmp_path / "quantized", source, stored, GPTQ)
    check_same_answers(quantized, _write(tmp_path / "reference", source, reference, None), Int4WeightOnlyLinear)
