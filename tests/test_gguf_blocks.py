"""engines/torch/gguf_blocks: a GGUF file's Q4_1 projections under kiln's names. On the embedded default model they
are exactly the weights of the checkpoint transformers converts the file to (q and k rows permuted back as
transformers does); a kind is taken only where every layer stores all of it as Q4_1; the blocks are cached beside
the converted checkpoint; a malformed tensor is named in one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engines.model_source import default_model_path, resolve_model
from engines.torch import gguf_blocks
from engines.torch.kernels.int_linear import int4_affine_dequantize

# SmolLM2-135M: 30 layers, 9 query heads, 3 key/value heads
LAYERS, HEADS, KV_HEADS = 30, 9, 3
HF_PARTS = {
    "qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "o_proj": ["self_attn.o_proj"],
    "gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "down_proj": ["mlp.down_proj"],
}


@pytest.fixture(scope="module")
def default_blocks() -> dict[str, torch.Tensor]:
    return gguf_blocks.q4_1_projections(default_model_path(), LAYERS, HEADS, KV_HEADS)


def test_the_default_models_blocks_are_its_converted_weights_exactly(default_blocks):
    folder = resolve_model(None)
    assert {name.split(".")[2] for name in default_blocks} == set(HF_PARTS)  # every projection is Q4_1 in this file
    with safe_open(str(folder / "model.safetensors"), "pt") as checkpoint:
        for i in range(LAYERS):
            for kind, parts in HF_PARTS.items():
                dense = torch.cat([checkpoint.get_tensor(f"model.layers.{i}.{p}.weight") for p in parts])
                assert dense.dtype == torch.float32
                packed, dm = (
                    default_blocks[f"layers.{i}.{kind}.qweight_packed"],
                    default_blocks[f"layers.{i}.{kind}.dm"],
                )
                ours = int4_affine_dequantize(packed, dm, 32, dense.shape[1], torch.float32)
                assert torch.equal(ours, dense), f"layer {i} {kind}"


def test_blocks_are_cached_beside_the_converted_checkpoint(tmp_path, default_blocks):
    folder = tmp_path / "converted"
    folder.mkdir()
    first = gguf_blocks.cached_q4_1_projections(default_model_path(), folder, LAYERS, HEADS, KV_HEADS)
    assert (folder / gguf_blocks.CACHE_FILE).is_file()
    assert not list(folder.glob("*.safetensors"))  # read_checkpoint must not take the cache for checkpoint weights
    again = gguf_blocks.cached_q4_1_projections(default_model_path(), folder, LAYERS, HEADS, KV_HEADS)
    assert first.keys() == again.keys() == default_blocks.keys()
    assert all(torch.equal(again[name], default_blocks[name]) for name in default_blocks)


def _write_gguf(path, types: dict) -> None:
    """A one-layer llama-architecture GGUF file whose projection tensors have the given block types."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    shapes = {
        "attn_q": (64, 64),
        "attn_k": (32, 64),
        "attn_v": (32, 64),
        "attn_output": (64, 64),
        "ffn_gate": (96, 64),
        "ffn_up": (96, 64),
        "ffn_down": (64, 96),
    }
    for part, (rows, cols) in shapes.items():
        qtype = types.get(part, gguf.GGMLQuantizationType.Q4_1)
        data = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        writer.add_tensor(f"blk.0.{part}.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_kind_is_taken_only_where_every_part_is_q4_1(tmp_path):
    import gguf

    path = tmp_path / "mixed.gguf"
    _write_gguf(path, {"attn_v": gguf.GGMLQuantizationType.Q8_0, "ffn_down": gguf.GGMLQuantizationType.F32})
    blocks = gguf_blocks.q4_1_projections(path, 1, 2, 1)
    assert {name.split(".")[2] for name in blocks} == {"o_proj", "gate_up_proj"}
    assert blocks["layers.0.gate_up_proj.dm"].shape == (192, 2, 2)  # gate and up rows, 64 columns = 2 groups


def test_blocks_dequantize_as_gguf_py_does(tmp_path):
    import gguf

    path = tmp_path / "q4_1.gguf"
    _write_gguf(path, {})
    reader = gguf.GGUFReader(str(path))
    blocks = gguf_blocks.q4_1_projections(path, 1, 2, 1)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(64, 64).copy())
    ours = int4_affine_dequantize(blocks["layers.0.o_proj.qweight_packed"], blocks["layers.0.o_proj.dm"], 32, 64)
    assert torch.equal(ours, expected)


def test_a_malformed_tensor_is_named():
    class Truncated:  # what GGUFReader hands out, with a block short
        name = "blk.3.ffn_up.weight"
        shape = [64, 2]
        data = np.zeros(2 * 2 * 20 - 1, dtype=np.uint8)

    with pytest.raises(gguf_blocks.GgufBlockError, match=r"GGUF tensor 'blk.3.ffn_up.weight' holds 79 bytes"):
        gguf_blocks._read_q4_1(Truncated(), processor=None)
