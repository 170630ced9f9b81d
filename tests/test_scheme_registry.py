"""Adding a precision touches only its scheme module and a registry entry: a toy precision, defined
here, with a stored weight format of its own, goes through profile validation, `kiln plan`, the build
(calibration, quantization, evaluation, engine directory) and the runtime layer the loader makes."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engines import schemes
from engines.build import manifest as mf
from engines.build.builder import build
from engines.build.quantize import LayerWeights
from engines.config import EngineConfig
from engines.hardware import Hardware
from engines.plan import ModelShape, format_plan, gpu_hardware, make_plan
from engines.profiles import ProfileError, bytes_per_param, load_profile, supported_on
from engines.schemes import LayerResult, QuantizeContext, Scheme
from engines.torch.layers.formats import StoredLayer, WeightFormat
from engines.torch.loader import load_engine_dir
from engines.torch.models.llama import PROJECTIONS
from engines.trtllm import api as trt
from tests.test_build import PROMPTS, greedy_tokens, options, tiny_chat_model  # noqa: F401 (fixture)


# --- the toy precision's own module: a format, its runtime layer and its scheme --------------------------------------
class ToyHalfLinear(nn.Module):
    """float16 weights, widened to the activations' dtype on every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_half, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_half.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class ToyHalfFormat(WeightFormat):
    name = "toy-half"

    def load(self, layer: StoredLayer) -> nn.Module:
        return ToyHalfLinear(layer.take("weight_half"), layer.bias)


class ToyHalf(Scheme):
    name = "toy-half"
    projection_format = "toy-half"
    head_format = "dense"
    default_kv = "model"
    family = "toy"
    plan_row = True
    bits_per_weight = 16.0
    calibration = frozenset({"channel_amax"})  # not needed for the math: shows calibration reaches the scheme
    min_sm = 75
    sm_reason = "toy tensor cores"
    formats: ClassVar[tuple[WeightFormat, ...]] = (ToyHalfFormat(),)

    def quantize_layer(self, layer: LayerWeights, ctx: QuantizeContext) -> dict[str, LayerResult]:
        out = {}
        for kind, w in layer.weights.items():
            observer = ctx.stats(layer.name(kind)).observer
            assert observer is not None
            ctx.collect("amax", float(observer.amax.max()))
            tensors = {f"{layer.name(kind)}.weight_half": w.half()}
            bias = layer.bias(kind)
            if bias is not None:
                tensors[f"{layer.name(kind)}.bias"] = bias.to(ctx.store)
            out[kind] = LayerResult(tensors)
        return out

    def details(self, ctx: QuantizeContext) -> dict[str, object]:
        return {"toy_amax_max": max(ctx.collected["amax"])}


# --- the registry entry -----------------------------------------------------------------------------------------
@pytest.fixture
def toy_scheme():
    schemes.register(ToyHalf())
    yield
    schemes.unregister("toy-half")


PROFILE = """name = "{name}"
description = "toy half-precision weights"
backend = ["torch"]
precision = "toy-half"
kv_cache_dtype = "model"
priority = 99
{extra}
[requires]
device = "{device}"
{requires}
"""


def write_profile(folder: Path, name: str, device: str = "cpu", requires: str = "", extra: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(PROFILE.format(name=name, device=device, requires=requires, extra=extra))
    return path


def test_unregistered_precision_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="'precision' must be one of"):
        load_profile(write_profile(tmp_path, "cpu-toy"))
    assert "toy-half" not in schemes.names()


def test_toy_precision_in_profiles(toy_scheme, tmp_path):
    profile = load_profile(write_profile(tmp_path, "cpu-toy"))
    assert profile.precision == "toy-half" and profile.weight_bytes(1000) == 1000  # 2 bytes per bf16 -> 2 per toy
    assert bytes_per_param("toy-half") == 2.0
    with pytest.raises(ProfileError, match="'group_size' applies to int4"):  # not a grouped scheme
        load_profile(write_profile(tmp_path, "cpu-toy-g", extra="group_size = 64"))
    gpu = load_profile(write_profile(tmp_path, "gpu-toy", device="cuda", requires="min_sm = 75"))
    ok, why = supported_on(gpu, Hardware(device="cuda", name="T4", memory_bytes=16 << 30, sm=75 - 5))
    assert not ok and "toy tensor cores" in why


def test_toy_precision_in_plan(toy_scheme, tmp_path):
    gpu = load_profile(write_profile(tmp_path, "gpu-toy", device="cuda", requires="min_sm = 75"))
    shape = ModelShape("toy-model", 1e9, 16, 8, 64)
    plan = make_plan(shape, gpu_hardware("L4"), max_model_len=1024, profiles=[gpu])
    row = next(r for r in plan.rows if r.precision == "toy")
    assert row.weight_bytes == 2e9 and row.kv_dtype == "bf16"
    assert plan.recommended is gpu and plan.profile_by_precision["toy"] == "gpu-toy"
    assert "Recommended profile: gpu-toy (toy-half weights" in format_plan(plan)


def test_toy_precision_builds_loads_and_serves(toy_scheme, tiny_chat_model, tmp_path):  # noqa: F811
    assert mf.requirements("toy-half", "cuda") == mf.Requirements(device="cuda", min_sm=75)
    with pytest.raises(trt.TrtllmUnsupported, match="'toy-half' is not one of them"):
        trt.check_gpu("toy-half", "model", 90, "H100")

    out = tmp_path / "engine"
    result = build(
        options(tiny_chat_model, out, precision="toy-half"),
        Hardware(device="cpu", name="test CPU", memory_bytes=8 << 30),
    )
    m = result.manifest
    assert m.precision == "toy-half" and m.calibration is not None
    assert m.weight_formats == {kind: "toy-half" for kind in PROJECTIONS} | {"lm_head": "dense"}
    assert result.report["details"]["toy_amax_max"] > 0  # the calibration statistics reached the scheme

    config = EngineConfig(engine_dir=str(out), kv_cache_memory=16 << 20)
    loaded = load_engine_dir(config)
    layer = loaded.model.layers[0]
    assert all(isinstance(getattr(layer, kind), ToyHalfLinear) for kind in PROJECTIONS)
    tokens = greedy_tokens(loaded, config, PROMPTS)
    assert [len(choices[0]) for choices in tokens.values()] == [12] * len(PROMPTS)
