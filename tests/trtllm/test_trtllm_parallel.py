"""Multi-GPU (issue #22, item 7): `kiln build --backend trtllm --tensor-parallel-size/--pipeline-parallel-size` hands
the split to TensorRT-LLM's LLM and records it in engine.json, `kiln serve` runs the engine at the split it was built
with on enough GPUs, the torch backend refuses a split, `kiln plan` plans per GPU, and compose reserves KILN_GPUS."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import engines.hardware
from engines import create_engine
from engines.build import manifest as mf
from engines.build.builder import BuildError, BuildOptions, build
from engines.config import EngineConfig
from engines.parallel import TORCH_REFUSAL, GpuSplit, SplitError
from engines.plan import PlanError, gpu_hardware, make_plan, shape_from_config
from engines.trtllm.engine import TrtllmEngine
from tests.test_plan import LLAMA_70B
from tests.trtllm.conftest import H100

REPO = Path(__file__).resolve().parents[2]
TWO_H100 = dataclasses.replace(H100, count=2)


def options(folder, out, **kw) -> BuildOptions:
    return BuildOptions(
        **(
            {"model": str(folder), "output": str(out), "backend": "trtllm", "precision": "fp8", "calib_samples": 16}
            | {"progress": False}
            | kw
        )
    )


def llm_calls(fake) -> list[dict]:
    return [args[0] for (kind, *args) in fake.CALLS if kind == "LLM"]


@pytest.fixture
def split_engine(fake_trtllm, tiny_chat_folder, tmp_path, monkeypatch):
    """A tensor-parallel-2 engine built on two H100s, the machine it is then served on."""
    fake_trtllm.FAKE.gpus = 2
    out = tmp_path / "engine"
    build(options(tiny_chat_folder, out, tensor_parallel_size=2), TWO_H100)
    monkeypatch.setattr(engines.hardware, "detect", lambda device=None: TWO_H100)
    return out


def test_the_build_hands_the_split_to_the_llm_and_records_it(split_engine, fake_trtllm):
    (kwargs,) = llm_calls(fake_trtllm)
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (2, 1)
    manifest = mf.load_manifest(split_engine)
    assert (manifest.trtllm.tensor_parallel_size, manifest.trtllm.pipeline_parallel_size) == (2, 1)
    assert {"trtllm/rank0.engine", "trtllm/rank1.engine"} <= set(manifest.files)  # one engine per rank


def test_a_split_wider_than_the_machine_is_refused_before_any_gpu_work(fake_trtllm, tiny_chat_folder, tmp_path):
    with pytest.raises(BuildError) as info:
        build(options(tiny_chat_folder, tmp_path / "e", tensor_parallel_size=2, pipeline_parallel_size=2), TWO_H100)
    assert str(info.value) == (
        "This build needs 4 GPUs (tensor parallel 2 x pipeline parallel 2) and this machine has 2 "
        f"({TWO_H100.name}); give the container more GPUs (compose: KILN_GPUS) or a smaller split."
    )
    assert llm_calls(fake_trtllm) == []


def test_serve_runs_the_engine_at_its_recorded_split(split_engine, fake_trtllm):
    fake_trtllm.reset()
    fake_trtllm.FAKE.gpus = 2
    engine = TrtllmEngine.from_config(EngineConfig(engine_dir=str(split_engine)))
    (kwargs,) = llm_calls(fake_trtllm)
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (2, 1)
    assert (engine.llm.tp_size, engine.llm.pp_size) == (2, 1)
    TrtllmEngine.from_config(EngineConfig(engine_dir=str(split_engine), tensor_parallel_size=2))  # confirming is fine


def test_serve_refuses_another_split_or_too_few_gpus_in_one_sentence(split_engine, fake_trtllm, monkeypatch):
    with pytest.raises(SplitError, match=r"^This engine was built for 2 GPUs \(tensor parallel 2 x pipeline"):
        create_engine(EngineConfig(engine_dir=str(split_engine), tensor_parallel_size=4))
    monkeypatch.setattr(engines.hardware, "detect", lambda device=None: H100)
    with pytest.raises(SplitError, match=r"^This engine needs 2 GPUs .* and this machine has 1 "):
        create_engine(EngineConfig(engine_dir=str(split_engine)))


def test_the_fake_fails_where_tensorrt_llm_fails(split_engine, fake_trtllm):
    """llmapi/llm_args.py BaseLlmArgs._load_config_from_engine: a size of 1 takes the engine's, another one raises;
    llmapi/llm.py BaseLLM.__init__: a world larger than the visible GPUs raises before any worker starts."""
    from tensorrt_llm._tensorrt_engine import LLM

    engine_dir = str(split_engine / "trtllm")
    assert LLM(engine_dir).tp_size == 2
    with pytest.raises(ValueError, match="tp_size 4 is not consistent with the engine's tp_size 2"):
        LLM(engine_dir, tensor_parallel_size=4)
    with pytest.raises(ValueError, match="pp_size 2 is not consistent with the engine's pp_size 1"):
        LLM(engine_dir, pipeline_parallel_size=2)
    fake_trtllm.FAKE.gpus = 1
    with pytest.raises(RuntimeError, match="Only 1 GPUs are available, but 2 are required."):
        LLM(engine_dir)


def test_the_torch_backend_refuses_a_split_in_one_sentence(tmp_path):
    with pytest.raises(BuildError, match=f"^{TORCH_REFUSAL}$".replace("(", r"\(").replace(")", r"\)")):
        build(BuildOptions(output=str(tmp_path / "t"), tensor_parallel_size=2))
    with pytest.raises(ValueError) as info:
        create_engine(EngineConfig(pipeline_parallel_size=2))
    assert str(info.value) == TORCH_REFUSAL
    from pydantic import ValidationError

    from server.settings import ServerSettings

    with pytest.raises(ValidationError, match="--backend trtllm only; kiln's torch engine runs on one device"):
        ServerSettings(tensor_parallel_size=2)
    with pytest.raises(BuildError, match="--tensor-parallel-size must be a whole number of at least 1, got 0"):
        BuildOptions(backend="trtllm", tensor_parallel_size=0).validate()


def test_plan_is_per_gpu_and_names_the_split_that_fits():
    shape = shape_from_config(LLAMA_70B, "llama-70b")
    one_rank = make_plan(shape, gpu_hardware("H100", 2))  # 131072 tokens of FP8 KV: 70 GB + 21 GB + headroom
    fp8 = next(row for row in one_rank.rows if row.precision == "fp8")
    assert one_rank.target_memory_bytes == gpu_hardware("H100").memory_bytes and not fp8.fits
    assert one_rank.recommended.precision == "fp8" and not one_rank.recommended_fits
    assert one_rank.suggested_tensor_parallel == 2
    two_ranks = make_plan(shape, gpu_hardware("H100", 2), split=GpuSplit(tensor=2))
    fp8_split = next(row for row in two_ranks.rows if row.precision == "fp8")
    assert fp8_split.weight_bytes == pytest.approx(fp8.weight_bytes / 2)
    assert fp8_split.kv_bytes == pytest.approx(fp8.kv_bytes / 2)  # 8 KV heads, 4 on each GPU
    assert fp8_split.fits and two_ranks.recommended_fits and two_ranks.suggested_tensor_parallel is None
    with pytest.raises(PlanError, match=r"needs --gpus 4 or more"):
        make_plan(shape, gpu_hardware("H100", 2), split=GpuSplit(tensor=2, pipeline=2))


def test_kiln_plan_says_a_70b_fp8_model_does_not_fit_one_h100_and_suggests_tensor_parallel_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "plan", "--model", str(tmp_path), "--gpu", "H100", "--gpus", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "sizes per GPU" in result.stdout
    assert (
        "Recommended profile: hopper-fp8 (fp8 weights, fp8 KV cache); it does not fit on 1 GPU (tensor parallel 1 x "
        "pipeline parallel 1): build it with --backend trtllm --tensor-parallel-size 2"
    ) in result.stdout


@pytest.mark.parametrize(("gpus", "count"), [(None, 1), ("2", 2), ("all", -1)])
def test_compose_gpu_reserves_kiln_gpus_for_both_services(gpus, count):
    docker = shutil.which("docker")
    assert docker, "the docker CLI with Compose v2 is needed to validate compose.gpu.yaml (apt-get install docker.io)"
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin"} | ({"KILN_GPUS": gpus} if gpus else {})
    result = subprocess.run(
        [docker, "compose", "-f", "compose.gpu.yaml", "--env-file", "/dev/null", "config", "--format", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in ("build", "server"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["count"] == count, f"{name} reserves {device['count']} GPUs with KILN_GPUS={gpus}"


def test_kiln_s_torch_build_picks_a_profile_for_one_gpu_of_several(monkeypatch):
    """kiln's torch engine runs on one device, so `--precision auto` must fit one GPU: a 40B model's INT8 weights
    (40 GB) fit two A100-40GB together but not one, so it gets INT4."""
    from types import SimpleNamespace

    from engines.build import builder

    monkeypatch.setattr(builder, "architecture", lambda model_type: SimpleNamespace(param_count=lambda args: 40e9))
    two_a100 = dataclasses.replace(H100, name="NVIDIA A100-SXM4-40GB", memory_bytes=40 << 30, sm=80, count=2)
    (chosen,) = builder._candidates(BuildOptions(), two_a100, SimpleNamespace(model_type="llama"), None)
    assert (chosen.precision, chosen.profile) == ("int4-awq", "any-gpu-int4-awq")
