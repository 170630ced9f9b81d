"""The model-architecture seam: a toy architecture defined only in this file, registered with one registry
entry, loads and generates through the engine like transformers and goes through the quantized build
(calibration, SmoothQuant/AWQ folding along its own topology, engine directory, load, generate).

The toy is Llama with its MLP stored as separate gate and up projections (kiln fuses them): one norm then
feeds two projections, which must share one smoothing scale, and down_proj's scale folds into all rows of
up_proj. Quantized, it must equal the fused Llama layer for layer, which checks that the generic folding
follows the topology it is given."""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from engines.base import GenerationRequest
from engines.build.builder import build
from engines.build.calibrate import Needs, calibrate_layer
from engines.build.quantize import quantize_model
from engines.build.stream import LayerRunner, embed
from engines.config import EngineConfig
from engines.model_source import resolve_model
from engines.torch.kernels.silu_mul import silu_mul
from engines.torch.loader import build_core, load_engine_dir, load_model
from engines.torch.models import llama
from engines.torch.models.registry import ARCHITECTURES, architecture
from engines.torch.models.topology import NormGroup, QuantTopology, RowFold
from tests.build_fixtures import build_options, tiny_llama_config
from tests.conftest import greedy, run_to_completion
from tests.test_engine_hf_parity import hf_greedy

TOY = "kiln-toy"
CPU = torch.device("cpu")
PROMPTS = [[1, 500, 600, 700, 800, 900], [1, 42, 4242, 31337, 7, 7, 7, 9000]]


# ---- the toy architecture: everything it needs, and nothing outside this block knows about it ----


class ToyForCausalLM(llama.LlamaForCausalLM):
    projections = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer.down_proj(silu_mul(torch.cat([layer.gate_proj(h), layer.up_proj(h)], dim=-1)))


def read_toy_checkpoint(
    folder: Path, args: llama.LlamaArgs, dtype: torch.dtype, device: torch.device, *, part=None
) -> dict[str, torch.Tensor]:
    tensors = llama.read_hf_checkpoint(folder, args, dtype, device, part=part)
    for i in range(args.num_layers) if part is None else part.layers:
        gate, up = tensors.pop(f"layers.{i}.gate_up_proj.weight").chunk(2)
        tensors[f"layers.{i}.gate_proj.weight"], tensors[f"layers.{i}.up_proj.weight"] = gate, up
    return tensors


def v_rows(args: llama.LlamaArgs) -> slice | None:
    return (
        slice((args.num_heads + args.num_kv_heads) * args.head_dim, None)
        if args.num_heads == args.num_kv_heads
        else None
    )


TOY_ARCHITECTURE = dataclasses.replace(
    llama.LLAMA,
    model_type=TOY,
    model_class=ToyForCausalLM,
    read_checkpoint=read_toy_checkpoint,
    assemble=partial(llama.assemble, model_class=ToyForCausalLM),
    topology=QuantTopology(
        norm_groups=(NormGroup("input_norm", ("qkv_proj",)), NormGroup("post_norm", ("gate_proj", "up_proj"))),
        row_folds=(
            RowFold("down_proj", "up_proj", lambda args: slice(None), reciprocal=True),
            RowFold("o_proj", "qkv_proj", v_rows, smooth=False),
        ),
    ),
)

# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_registered():
    """The registry entry (and transformers' name for the toy's config.json), for this module only."""
    from transformers import AutoConfig, LlamaConfig

    class ToyConfig(LlamaConfig):
        model_type = TOY

    AutoConfig.register(TOY, ToyConfig, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ARCHITECTURES, TOY, TOY_ARCHITECTURE)
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory, toy_registered) -> tuple[Path, Path]:
    """(Llama folder, the same weights as a toy folder): a 2-layer random Llama with multi-head attention
    (so o_proj's AWQ scale folds into the v rows too), sized to the default tokenizer's vocabulary."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("registry")
    config = tiny_llama_config(num_key_value_heads=4)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "llama")
    default = resolve_model(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default / name).is_file():
            shutil.copy(default / name, root / "llama" / name)
    shutil.copytree(root / "llama", root / "toy")
    toy_config = json.loads((root / "toy" / "config.json").read_text())
    (root / "toy" / "config.json").write_text(json.dumps(toy_config | {"model_type": TOY}))
    return root / "llama", root / "toy"


def generate(loaded) -> dict:
    core = build_core(EngineConfig(kv_cache_memory=16 << 20), loaded)
    requests = [GenerationRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    return {k: v[0] for k, v in run_to_completion(core, requests).items()}


def test_unknown_model_type_names_it_and_the_known_ones():
    with pytest.raises(ValueError) as info:
        architecture("gpt-nope")
    known = "llama, mistral, qwen2, qwen3, olmo2, gemma2, gemma3_text, phi3, mixtral, qwen3_moe"
    assert str(info.value) == f"Model type 'gpt-nope' is not supported; kiln's torch engine runs {known}."


def test_llama_family_shares_one_module_and_qwen2_quirks_are_args():
    from transformers import Qwen2Config

    assert {ARCHITECTURES[t].model_class for t in ("llama", "mistral", "qwen2")} == {llama.LlamaForCausalLM}
    qwen = ARCHITECTURES["qwen2"].args_from_config(Qwen2Config(sliding_window=4096, use_sliding_window=False))
    assert qwen.qkv_bias and set(qwen.layer_windows) == {None} and qwen.model_type == "qwen2"


def test_toy_loads_and_generates_like_transformers(folders):
    from transformers import AutoModelForCausalLM

    llama_folder, toy_folder = folders
    loaded = load_model(EngineConfig(model=str(toy_folder), dtype="float32"))
    assert type(loaded.model) is ToyForCausalLM and loaded.model.layers[0].gate_proj is not None
    hf = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    got = generate(loaded)
    for i, prompt in enumerate(PROMPTS):
        assert got[str(i)] == hf_greedy(hf, prompt, 12, eos=False)


def calibrate(model, prompts: list[list[int]], needs: Needs) -> dict:
    """Every projection's statistics, each layer calibrated on the float layers' outputs before it."""
    runner = LayerRunner(model, torch.float32, CPU, max(map(len, prompts)))
    xs = embed(model, prompts, CPU)
    stats = {}
    for i, layer in enumerate(model.layers):
        stats |= calibrate_layer(runner, i, xs, needs).projections
        xs = [runner.forward(layer, x)[0] for x in xs]
    return stats


def _float_model(arch, folder: Path):
    from transformers import AutoConfig

    args = arch.args_from_config(AutoConfig.from_pretrained(folder))
    tensors = arch.read_checkpoint(folder, args, torch.float32, CPU)
    return args, tensors, arch.assemble(args, dict(tensors), {}, torch.float32, CPU)


@pytest.mark.parametrize("precision", ["int8-sq", "int4-awq"])
def test_toy_folds_along_its_topology_like_the_fused_llama(folders, precision):
    llama_folder, toy_folder = folders
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (7, 19, 33)]
    needs = Needs(samples=True, channel_amax=True)
    l_args, l_tensors, l_model = _float_model(llama.LLAMA, llama_folder)
    t_args, t_tensors, t_model = _float_model(TOY_ARCHITECTURE, toy_folder)

    t_stats = calibrate(t_model, prompts, needs)
    assert set(t_stats) == {f"layers.{i}.{k}" for i in range(2) for k in ToyForCausalLM.projections}
    # Identical statistics for both (the random AWQ row samples differ between 4 and 5 recorded
    # projections): gate and up read what gate_up reads.
    l_stats = calibrate(l_model, prompts, needs)
    t_stats = dict(l_stats)
    for i in range(2):
        t_stats[f"layers.{i}.gate_proj"] = t_stats[f"layers.{i}.up_proj"] = t_stats[f"layers.{i}.gate_up_proj"]

    fused = quantize_model(l_tensors, l_args, precision, l_stats, group_size=32, progress=False).tensors
    split = quantize_model(t_tensors, t_args, precision, t_stats, group_size=32, progress=False).tensors
    for name, tensor in fused.items():
        if ".gate_up_proj." in name:
            gate, up = (split[name.replace("gate_up_proj", kind)] for kind in ("gate_proj", "up_proj"))
            assert torch.equal(tensor, torch.cat([gate, up])), name
        else:
            assert torch.equal(tensor, split[name]), name


def test_toy_builds_a_quantized_engine_that_loads_and_generates(folders, tmp_path):
    llama_folder, toy_folder = folders
    toy = build(build_options(toy_folder, tmp_path / "toy", precision="int8-sq"))
    assert toy.manifest.model.model_type == TOY
    assert set(toy.manifest.weight_formats) == {*ToyForCausalLM.projections, "lm_head"}
    loaded = load_engine_dir(EngineConfig(engine_dir=str(tmp_path / "toy")))
    assert type(loaded.model) is ToyForCausalLM
    assert type(loaded.model.layers[0].up_proj).__name__ == "W8A8Int8Linear"
    tokens = generate(loaded)
    assert all(len(t) == 12 for t in tokens.values())
    # the same weights built as the fused Llama lose as much accuracy: the toy's folding is as exact
    fused = build(build_options(llama_folder, tmp_path / "llama", precision="int8-sq"))
    assert toy.report["accuracy"]["kl_mean"] == pytest.approx(fused.report["accuracy"]["kl_mean"], rel=0.05, abs=1e-4)
