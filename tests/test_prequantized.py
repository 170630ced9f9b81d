"""Pre-quantized checkpoints (engines/torch/prequantized): a tiny random Llama's projections quantized as GPTQ, AWQ,
FP8 and compressed-tensors write them (tests/prequant_writers.py), served by kiln in their stored format, answer as
kiln's dense load of the dequantized weights does: greedy tokens equal over 32 tokens in float32 and the chosen
tokens' logprobs within LOGPROB_TOL. Malformed checkpoints get one sentence naming the tensor or field."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engines.config import EngineConfig
from engines.torch.layers.linear import DenseLinear
from engines.torch.layers.quantized import Fp8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from engines.torch.loader import load_model
from tests import prequant_writers as writers
from tests.prequant_folders import (
    LinearWriter,
    ct_config,
    folder_answers,
    tiny_llama_state,
    write_folder,
    write_pair,
)

LOGPROB_TOL = 1e-3  # exact dequantized weights on both sides: only the kernels' fp32 summation order differs


@pytest.fixture(scope="module")
def tiny_llama() -> dict[str, torch.Tensor]:
    return tiny_llama_state()


def check_same_answers(quantized: Path, reference: Path, layer_type: type) -> object:
    loaded, ours = folder_answers(quantized)
    _, theirs = folder_answers(reference)
    projections = [m for m in loaded.model.modules() if isinstance(m, layer_type)]
    assert len(projections) == 4 * loaded.model.args.num_layers  # every projection in its stored format
    assert isinstance(loaded.model.lm_head, DenseLinear)  # the float LM head stays float
    for rid, steps in theirs.items():
        assert [s.token_id for s in ours[rid]] == [s.token_id for s in steps], rid
        assert len(steps) == 32
        for step, (a, b) in enumerate(zip(ours[rid], steps)):
            assert abs(a.logprob - b.logprob) < LOGPROB_TOL, f"{rid} token {step}"
    return loaded


# ---------------------------------------------------------------------------------------------------- GPTQ


def _act_order(module: str, k: int) -> torch.Tensor:
    """desc_act's column order, the same for the modules that read the same input (q/k/v, gate/up), as GPTQ's
    Hessians of one input give."""
    reads = "attn" if any(p in module for p in ("q_proj", "k_proj", "v_proj")) else module
    reads = "mlp" if any(p in module for p in ("gate_proj", "up_proj")) else reads
    layer = module.split(".")[2]
    return torch.randperm(k, generator=torch.Generator().manual_seed(zlib.crc32(f"{layer} {reads}".encode())))


GPTQ_CASES = {
    "4bit-g16-sym": dict(bits=4, group_size=16, sym=True, desc_act=False),
    "4bit-g16-asym-act-order": dict(bits=4, group_size=16, sym=False, desc_act=True),
    "4bit-per-channel-asym": dict(bits=4, group_size=-1, sym=False, desc_act=False),
    "4bit-g32-sym-act-order-v2": dict(bits=4, group_size=32, sym=True, desc_act=True, checkpoint_format="gptq_v2"),
    "8bit-per-channel-sym": dict(bits=8, group_size=-1, sym=True, desc_act=False),
}


def gptq_config(case: dict) -> dict:
    return {"quant_method": "gptq", "damp_percent": 0.01, "true_sequential": True, **case}


def gptq_writer(case: dict) -> LinearWriter:
    v1 = case.get("checkpoint_format", "gptq") == "gptq"

    def write(module: str, w: torch.Tensor):
        perm = _act_order(module, w.shape[1]) if case["desc_act"] else None
        return writers.gptq_linear(w, case["bits"], case["group_size"], case["sym"], perm, v1)

    return write


@pytest.mark.parametrize("name", sorted(GPTQ_CASES))
def test_gptq_answers_as_its_dequantized_weights(tiny_llama, tmp_path, name):
    case = GPTQ_CASES[name]
    quantized, reference = write_pair(tmp_path, tiny_llama, gptq_config(case), gptq_writer(case))
    layer_type = Int8WeightOnlyLinear if case["bits"] == 8 else Int4WeightOnlyLinear
    loaded = check_same_answers(quantized, reference, layer_type)
    assert loaded.quantization == "gptq"
    qkv = loaded.model.layers[0].qkv_proj
    if case["bits"] == 4:
        assert (qkv.perm is not None) == case["desc_act"]  # act-order kept as kiln's column permutation


# ---------------------------------------------------------------------------------------------------- AWQ


def test_awq_gemm_answers_as_its_dequantized_weights(tiny_llama, tmp_path):
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    quantized, reference = write_pair(tmp_path, tiny_llama, config, lambda m, w: writers.awq_linear(w, 32))
    check_same_answers(quantized, reference, Int4WeightOnlyLinear)


def test_awq_column_order_is_autoawqs():
    """Codes packed by the writer (AutoAWQ's from_linear order) unpack to their columns (reverse_awq_order)."""
    from engines.torch.prequantized.awq import awq_columns
    from engines.torch.prequantized.packing import unpack_int32

    codes = torch.randint(0, 16, (3, 16), dtype=torch.int32)
    assert torch.equal(awq_columns(unpack_int32(writers.pack_awq(codes), 4, dim=1)), codes)


# ---------------------------------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_fp8_answers_as_its_dequantized_weights(tiny_llama, tmp_path, per_channel):
    config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    writer = lambda m, w: writers.fp8_linear(w, per_channel)  # noqa: E731
    quantized, reference = write_pair(tmp_path, tiny_llama, config, writer)
    loaded = check_same_answers(quantized, reference, Fp8Linear)
    # per-tensor q, k and v scales differ: fused, each row keeps its own
    assert loaded.model.layers[0].qkv_proj.per_channel


# ---------------------------------------------------------------------------------------------- compressed-tensors

CT_CASES = {
    "pack-quantized-int4-group-sym": ("pack-quantized", dict(num_bits=4, strategy="group", group_size=16)),
    "pack-quantized-int4-group-asym": (
        "pack-quantized",
        dict(num_bits=4, strategy="group", group_size=32, symmetric=False),
    ),
    "pack-quantized-int4-channel": ("pack-quantized", dict(num_bits=4, strategy="channel")),
    "pack-quantized-int4-tensor-asym": ("pack-quantized", dict(num_bits=4, strategy="tensor", symmetric=False)),
    "pack-quantized-int8-channel": ("pack-quantized", dict(num_bits=8, strategy="channel")),
    "int-quantized-int8-channel": ("int-quantized", dict(num_bits=8, strategy="channel")),
    "float-quantized-fp8-channel": ("float-quantized", dict(num_bits=8, type="float", strategy="channel")),
    "float-quantized-fp8-tensor": ("float-quantized", dict(num_bits=8, type="float", strategy="tensor")),
}


@pytest.mark.parametrize("name", sorted(CT_CASES))
def test_compressed_tensors_answers_as_its_dequantized_weights(tiny_llama, tmp_path, name):
    fmt, weights = CT_CASES[name]
    scheme, config = ct_config(fmt, weights)
    writer = lambda m, w: writers.compressed_tensors_linear(w, scheme, fmt)  # noqa: E731
    quantized, reference = write_pair(tmp_path, tiny_llama, config, writer)
    layer_type = {4: Int4WeightOnlyLinear, 8: Int8WeightOnlyLinear}[weights["num_bits"]]
    check_same_answers(quantized, reference, Fp8Linear if weights.get("type") == "float" else layer_type)


def test_compressed_tensors_ignored_modules_stay_float(tiny_llama, tmp_path):
    fmt, weights = CT_CASES["pack-quantized-int4-group-sym"]
    scheme, config = ct_config(fmt, weights)
    config["ignore"] = ["lm_head", "re:.*down_proj$"]

    def writer(module: str, w: torch.Tensor):
        if module.endswith("down_proj"):
            return {"weight": w}, w
        return writers.compressed_tensors_linear(w, scheme, fmt)

    quantized, reference = write_pair(tmp_path, tiny_llama, config, writer)
    loaded, ours = folder_answers(quantized)
    _, theirs = folder_answers(reference)
    assert {r: [t.token_id for t in steps] for r, steps in ours.items()} == {
        r: [t.token_id for t in steps] for r, steps in theirs.items()
    }
    layer = loaded.model.layers[1]
    assert isinstance(layer.down_proj, DenseLinear) and isinstance(layer.gate_up_proj, Int4WeightOnlyLinear)


# ---------------------------------------------------------------------------------------------- malformed


@pytest.fixture(scope="module")
def gptq_folder(tiny_llama, tmp_path_factory) -> Path:
    case = GPTQ_CASES["4bit-g16-asym-act-order"]
    quantized, _ = write_pair(tmp_path_factory.mktemp("gptq"), tiny_llama, gptq_config(case), gptq_writer(case))
    return quantized


def _edit(source: Path, target: Path, tensors: Callable | None = None, config: Callable | None = None) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(source / "model.safetensors"))
    if tensors is not None:
        tensors(state)
    quantization_config = json.loads((source / "config.json").read_text())["quantization_config"]
    if config is not None:
        config(quantization_config)
    return write_folder(target, state, quantization_config)


def _load(folder: Path, **kw):
    return load_model(EngineConfig(model=str(folder), dtype="float32", **kw))


Q_PROJ = "model.layers.0.self_attn.q_proj"


def test_a_missing_tensor_is_named(gptq_folder, tmp_path):
    folder = _edit(gptq_folder, tmp_path, tensors=lambda s: s.pop(f"{Q_PROJ}.scales"))
    with pytest.raises(KeyError, match=f"lacks tensor '{Q_PROJ}.scales'"):
        _load(folder)


def test_a_wrong_shape_is_named(gptq_folder, tmp_path):
    folder = _edit(gptq_folder, tmp_path, tensors=lambda s: s.update({f"{Q_PROJ}.scales": s[f"{Q_PROJ}.scales"][:2]}))
    with pytest.raises(
        ValueError, match=rf"{Q_PROJ}.scales has shape \[2, 64\] and {Q_PROJ}.qzeros unpacks to \[4, 64\]"
    ):
        _load(folder)


def test_fused_parts_with_different_act_orders_are_refused(gptq_folder, tmp_path):
    k_proj = "model.layers.0.self_attn.k_proj.g_idx"
    folder = _edit(gptq_folder, tmp_path, tensors=lambda s: s.update({k_proj: s[k_proj].flip(0).contiguous()}))
    with pytest.raises(ValueError, match="layers.0.qkv_proj fuses checkpoint modules whose act-order g_idx differ"):
        _load(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(bits=3), "quantization_config.bits is 3; kiln reads 4, 8"),
        (lambda c: c.update(quant_method="bitsandbytes"), "quant_method 'bitsandbytes' is not one kiln loads"),
        (lambda c: c.update(checkpoint_format="marlin"), "checkpoint_format 'marlin' is not one kiln reads"),
    ],
    ids=["bits", "quant_method", "checkpoint_format"],
)
def test_an_unsupported_field_is_named(gptq_folder, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        _load(_edit(gptq_folder, tmp_path, config=edit))


def test_block_wise_fp8_is_refused(tiny_llama, tmp_path):
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    quantized, _ = write_pair(tmp_path, tiny_llama, config, lambda m, w: writers.fp8_linear(w, True))
    with pytest.raises(ValueError, match="block-wise FP8 .* has no kiln runtime format"):
        _load(quantized)


def test_8bit_gptq_with_groups_is_refused(tiny_llama, tmp_path):
    case = dict(bits=8, group_size=16, sym=True, desc_act=False)
    quantized, _ = write_pair(tmp_path, tiny_llama, gptq_config(case), gptq_writer(case))
    with pytest.raises(ValueError, match="8-bit weights with groups, zero points or act-order have no kiln runtime"):
        _load(quantized)


@pytest.mark.parametrize("quantization", ["int8-wo", "none"])
def test_load_time_quantization_of_a_prequantized_folder_is_refused(gptq_folder, quantization):
    with pytest.raises(ValueError, match=f"already quantized .* --quantization {quantization} applies to float"):
        _load(gptq_folder, quantization=quantization)
