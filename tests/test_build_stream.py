"""The build's layer-by-layer pieces (engines/build/stream.py, shards.py): every architecture's checkpoint read a part
at a time gives the tensors of the whole read, the float model run a layer at a time gives its full forward's
outputs bit for bit, and shards joined into one safetensors file hold what save_file would have written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engines.build.shards import Shards
from engines.build.stream import Checkpoint, float_outputs
from engines.torch.models.architecture import OUTER, CheckpointPart
from engines.torch.models.registry import architecture
from engines.torch.sequence_runner import SequenceRunner
from tests.test_qwen3_olmo2_build import save_tiny_chat_model

CPU = torch.device("cpu")
MODEL_TYPES = ["qwen3", "olmo2", "gemma2", "gemma3_text", "phi3"]


@pytest.fixture(scope="module")
def checkpoint_of(tmp_path_factory):
    made: dict[str, Checkpoint] = {}

    def get(model_type: str) -> Checkpoint:
        if model_type not in made:
            from transformers import AutoConfig

            folder = tmp_path_factory.mktemp(model_type)
            save_tiny_chat_model(model_type, folder)
            arch = architecture(model_type)
            made[model_type] = Checkpoint(folder, arch, arch.args_from_config(AutoConfig.from_pretrained(folder)), CPU)
        return made[model_type]

    return get


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parts_of_a_checkpoint_are_its_whole_read(checkpoint_of, model_type):
    c = checkpoint_of(model_type)
    whole = c.arch.read_checkpoint(c.folder, c.args, torch.float32, CPU)
    parts = c.arch.read_checkpoint(c.folder, c.args, torch.float32, CPU, part=OUTER)
    assert not any(name.startswith("layers.") for name in parts)
    for i in range(c.args.num_layers):
        layer = c.arch.read_checkpoint(c.folder, c.args, torch.float32, CPU, part=CheckpointPart.layer(i))
        assert layer and all(name.startswith(f"layers.{i}.") for name in layer)
        parts |= layer
    assert sorted(parts) == sorted(whole)
    for name, tensor in whole.items():
        assert torch.equal(parts[name], tensor), name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_layer_at_a_time_equals_the_full_forward(checkpoint_of, model_type):
    c = checkpoint_of(model_type)
    sequences = [[1, 500, 600, 700, 800, 900, 17, 23, 5, 9], [1, 42, 4242, 31337, 7, 7, 7, 9000, 12, 13, 14, 15]]
    rows = [slice(3, 10), slice(0, 12)]
    full = c.arch.assemble(c.args, c.arch.read_checkpoint(c.folder, c.args, torch.float32, CPU), {}, torch.float32, CPU)
    runner = SequenceRunner(full, torch.float32, CPU, 16)
    shell = c.shell(c.outer(), {}, torch.float32)
    streamed = float_outputs(c, shell, sequences, rows)
    for ids, row, got in zip(sequences, rows, streamed):
        assert torch.equal(got, runner.hidden(ids)[row])
    assert shell.layers[0].qkv_proj is None  # every layer freed after its turn


def test_joined_shards_hold_every_tensor_as_saved(tmp_path):
    g = torch.Generator().manual_seed(0)
    first = {
        "layers.0.w": torch.randn(3, 5, generator=g),
        "layers.0.codes": torch.randint(0, 255, (7,), dtype=torch.uint8),
    }
    second = {
        "lm_head.scales": torch.randn(4, generator=g).to(torch.bfloat16),
        "lm_head.qweight": torch.randint(-8, 8, (4, 6), dtype=torch.int8),
        "embed_tokens.weight": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn),
    }
    shards = Shards(tmp_path / "parts")
    shards.add(first)
    shards.add(second)
    shards.join(tmp_path / "weights.safetensors", {"format": "pt"})
    joined = load_file(str(tmp_path / "weights.safetensors"))
    assert sorted(joined) == sorted(first | second)
    for name, tensor in (first | second).items():
        assert joined[name].dtype == tensor.dtype
        assert torch.equal(joined[name].view(torch.uint8), tensor.view(torch.uint8)), name
    shards.discard()
    assert not (tmp_path / "parts").exists()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_kv_calibration_alone_records_what_the_full_layer_does(checkpoint_of, model_type):
    """Calibrating only the KV cache stops each layer at its output projection; the keys and values it records are
    those a full run of the layer writes."""
    from engines.build.calibrate import Needs, calibrate_layer
    from engines.build.stream import LayerRunner, embed

    c = checkpoint_of(model_type)
    shell = c.shell(c.outer(), {}, torch.float32)
    sequences = [[1, 500, 600, 700, 800, 900, 17, 23, 5, 9], [1, 42, 4242, 31337, 7, 7, 7, 9000, 12, 13, 14, 15]]
    runner = LayerRunner(shell, torch.float32, CPU, 16)
    xs = embed(shell, sequences, CPU)
    for i in range(c.args.num_layers):
        layer = runner.load(i, c.layer(i), {})
        alone = calibrate_layer(runner, i, xs, Needs(kv=True))
        full = calibrate_layer(runner, i, xs, Needs(kv=True, channel_amax=True))
        assert torch.equal(alone.kv_amax, full.kv_amax) and torch.equal(alone.kv_samples, full.kv_samples)
        assert full.projections[f"layers.{i}.down_proj"].tokens == 22  # the full run reached the MLP
        assert alone.projections[f"layers.{i}.down_proj"].tokens == 0
        assert layer.o_proj is not None and not type(layer.o_proj).__name__.startswith("_")  # put back
        xs = [runner.forward(layer, x)[0] for x in xs]
        shell.unload_layer(i)
