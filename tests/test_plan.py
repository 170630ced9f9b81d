"""Capacity planning: parameter and KV math against hand computations, GPU table, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines.hardware import Hardware
from engines.plan import (
    GPUS,
    ModelShape,
    PlanError,
    format_plan,
    gpu_hardware,
    gpu_spec,
    make_plan,
    parse_count,
    shape_from_config,
)

REPO = Path(__file__).resolve().parent.parent
GB = 1e9

LLAMA_70B = {  # Llama-3.1-70B's config.json, the fields that matter
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


def test_70b_weights_per_precision():
    shape = shape_from_config(LLAMA_70B, "llama-70b")
    assert shape.params == pytest.approx(70.55e9, rel=0.005)  # Meta's published 70.6B
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (80, 8, 128)
    plan = make_plan(shape, gpu_hardware("H100", 4), max_model_len=4096)
    weights = {row.precision: row.weight_bytes for row in plan.rows}
    assert weights["bf16"] == pytest.approx(140 * GB, rel=0.03)
    assert weights["fp8"] == pytest.approx(70 * GB, rel=0.03)
    assert weights["int8"] == pytest.approx(70 * GB, rel=0.03)
    assert weights["int4"] == pytest.approx(35 * GB, rel=0.06)  # + fp16 scale and 4-bit zero per 128 weights
    assert weights["int4"] == pytest.approx(shape.params * (0.5 + 2.5 / 128))


def test_kv_cache_matches_hand_computation():
    shape = shape_from_config(LLAMA_70B)
    plan = make_plan(shape, gpu_hardware("H200", 2), batch=8, max_model_len=8192)
    rows = {row.precision: row for row in plan.rows}
    per_token_bf16 = 2 * 80 * 8 * 128 * 2  # K and V x layers x kv heads x head dim x 2 bytes = 327,680 bytes
    assert rows["bf16"].kv_bytes == 8 * 8192 * per_token_bf16 == 21_474_836_480
    assert rows["fp8"].kv_bytes == rows["int8"].kv_bytes == rows["int4"].kv_bytes == 8 * 8192 * per_token_bf16 / 2
    for row in rows.values():
        assert row.headroom_bytes == pytest.approx(0.10 * (row.weight_bytes + row.kv_bytes))
        assert row.total_bytes == pytest.approx(row.weight_bytes + row.kv_bytes + row.headroom_bytes)
    assert plan.target_memory_bytes == gpu_spec("H200").memory_bytes  # one GPU's: nothing splits the model


def test_fit_and_recommendation():
    shape = shape_from_config(LLAMA_70B)
    one_h100 = make_plan(shape, gpu_hardware("h100"), max_model_len=4096)
    fits = {row.precision: row.fits for row in one_h100.rows}
    assert fits == {"bf16": False, "fp8": True, "int8": True, "int4": True}
    assert one_h100.recommended.name == "hopper-fp8" and one_h100.recommended_fits
    a100 = make_plan(shape, gpu_hardware("A100-40GB"), max_model_len=4096)
    assert a100.recommended.name == "any-gpu-int4-awq"
    assert a100.profile_by_precision == {"bf16": "gpu-bf16", "int8": "ampere-int8-sq", "int4": "any-gpu-int4-awq"}
    text = format_plan(a100)
    assert "Recommended profile: any-gpu-int4-awq" in text and "A100-40GB" in text


def test_small_model_on_cpu_recommends_int8():
    cpu = Hardware(device="cpu", name="cpu", memory_bytes=16 << 30, cpu_flags=frozenset({"avx2"}))
    shape = ModelShape("small", params=135e6, layers=30, kv_heads=3, head_dim=64, max_position_embeddings=8192)
    plan = make_plan(shape, cpu)
    assert plan.max_model_len == 8192 and plan.recommended.name == "cpu-int8"
    assert "fp8" not in plan.profile_by_precision


def test_tied_embeddings_and_gqa_defaults():
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 512,
        "tie_word_embeddings": True,
    }
    shape = shape_from_config(config)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v, o (MHA) + mlp + norms
    assert shape.params == 2 * per_layer + 512 * 64 + 64
    assert (shape.kv_heads, shape.head_dim) == (4, 16)


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(PlanError) as info:
        gpu_spec("B200")
    message = str(info.value)
    assert "'B200'" in message and all(spec.name in message for spec in GPUS)
    assert gpu_spec("rtx 4090").name == "RTX-4090" and gpu_spec("a100-80gb").memory_bytes == 80 << 30


def test_parse_count():
    assert parse_count("70e9") == 70e9 and parse_count("70B") == 70e9 and parse_count("135m") == 135e6
    with pytest.raises(PlanError):
        parse_count("lots")


def _kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_kiln_plan_on_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    result = _kiln(
        "plan", "--model", str(tmp_path), "--gpu", "H100", "--gpus", "2", "--max-model-len", "8192", "--batch", "4"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("precision"))
    assert header.split()[:3] == ["precision", "weights", "KV"]
    assert [line.split()[0] for line in lines if line.split()[:1] in (["bf16"], ["fp8"], ["int8"], ["int4"])] == [
        "bf16",
        "fp8",
        "int8",
        "int4",
    ]
    assert "141 GB" in result.stdout and "Recommended profile: hopper-fp8" in result.stdout


def test_kiln_plan_from_overrides():
    result = _kiln(
        "plan",
        "--params",
        "70e9",
        "--layers",
        "80",
        "--kv-heads",
        "8",
        "--head-dim",
        "128",
        "--gpu",
        "L40S",
        "--max-model-len",
        "4096",
    )
    assert result.returncode == 0, result.stderr
    assert "140 GB" in result.stdout and "Recommended profile: any-gpu-int4-awq" in result.stdout


@pytest.mark.parametrize(
    "args, contains",
    [
        (["--gpu", "B200"], "Unknown GPU 'B200'; known GPUs are H100"),
        (["--model", "someone/not-downloaded"], "--params, --layers, --kv-heads and --head-dim"),
        (["--gpus", "2"], "--gpus needs --gpu"),
        (["--params", "lots", "--layers", "1", "--kv-heads", "1", "--head-dim", "1"], "not a number"),
        (["--batch", "0", "--params", "1B", "--layers", "1", "--kv-heads", "1", "--head-dim", "1"], "--batch"),
    ],
)
def test_kiln_plan_bad_input(args, contains):
    result = _kiln("plan", *args)
    assert result.returncode == 2
    assert contains in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_kiln_profiles_prints_the_table():
    result = _kiln("profiles")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("This machine: ")
    header = next(line for line in out.splitlines() if line.startswith("name"))
    assert header.split() == ["name", "precision", "KV", "cache", "backend", "requires", "this", "machine"]
    for name in ("hopper-fp8", "ampere-int8-sq", "cpu-int8", "cpu-fp32"):
        assert any(line.startswith(name + " ") for line in out.splitlines())
    assert "--precision auto picks " in out
