"""Build profiles: every shipped file validates; broken files fail with one sentence naming the file;
`pick` follows the rules in engines/profiles.py's docstring for injected hardware."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.hardware import Hardware
from engines.profiles import PROFILES_DIR, ProfileError, load_profile, load_profiles, pick, supported_on

GB = 1e9
GiB = 1 << 30

H100 = Hardware(device="cuda", name="H100", memory_bytes=80 * GiB, sm=90)
L40S = Hardware(device="cuda", name="L40S", memory_bytes=48 * GiB, sm=89)
A100_40 = Hardware(device="cuda", name="A100-40GB", memory_bytes=40 * GiB, sm=80)
T4 = Hardware(device="cuda", name="T4", memory_bytes=16 * GiB, sm=75)
SPR = Hardware(
    device="cpu",
    name="Xeon",
    memory_bytes=64 * GiB,
    cores=8,
    cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}),
)
SMALL_CPU = Hardware(device="cpu", name="small", memory_bytes=8 * GiB, cpu_flags=frozenset({"avx2"}))

EXPECTED = {
    "hopper-fp8",
    "ada-fp8",
    "ampere-int8-sq",
    "any-gpu-int4-awq",
    "gpu-bf16",
    "cpu-int8",
    "cpu-int4",
    "cpu-bf16",
    "cpu-fp32",
}


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def test_every_profile_loads(profiles):
    assert {p.name for p in profiles} >= EXPECTED
    assert [p.priority for p in profiles] == sorted((p.priority for p in profiles), reverse=True)
    for path in sorted(PROFILES_DIR.glob("*.toml")):
        profile = load_profile(path)
        assert profile.name == path.stem and profile.description and profile.backend


def test_profile_contents(profiles):
    by_name = {p.name: p for p in profiles}
    assert (by_name["hopper-fp8"].precision, by_name["hopper-fp8"].kv_cache_dtype) == ("fp8", "fp8")
    assert (by_name["ampere-int8-sq"].precision, by_name["ampere-int8-sq"].kv_cache_dtype) == ("int8-sq", "int8")
    assert (by_name["ampere-int8-sq"].requires.min_sm, by_name["ampere-int8-sq"].requires.max_sm) == (80, 86)
    assert by_name["any-gpu-int4-awq"].precision == "int4-awq" and by_name["any-gpu-int4-awq"].group_size == 128
    assert (by_name["cpu-int8"].precision, by_name["cpu-int8"].kv_cache_dtype) == ("int8-wo", "int8")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


GOOD = """name = "x"
description = "d"
backend = "torch"
precision = "int8-wo"
kv_cache_dtype = "int8"
priority = 1

[requires]
device = "cpu"
"""


@pytest.mark.parametrize(
    "text, contains",
    [
        (GOOD.replace('precision = "int8-wo"\n', ""), "missing field 'precision'"),
        (GOOD.replace('"int8-wo"', '"int3"'), "'precision' must be one of"),
        (GOOD.replace('backend = "torch"', 'backend = "vllm"'), "'backend'"),
        (GOOD.replace('device = "cpu"', 'device = "tpu"'), "'requires.device'"),
        (GOOD.replace('device = "cpu"', 'device = "cpu"\nmin_sm = 80'), "cuda profiles only"),
        (GOOD.replace('name = "x"', 'name = "y"'), "must match the file name"),
        ("colour = 1\n" + GOOD, "unknown field 'colour'"),
        (GOOD + "colour = 1\n", "unknown field 'requires.colour'"),
        ("name = ", "not valid TOML"),
    ],
)
def test_broken_profile_is_one_sentence_naming_the_file(tmp_path, text, contains):
    path = _write(tmp_path, "x", text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert contains in message and str(path) in message
    assert "\n" not in message and message.endswith(".")


def test_good_profile_loads_and_broken_folder_fails(tmp_path):
    assert load_profile(_write(tmp_path, "x", GOOD)).backend == ("torch",)
    _write(tmp_path, "bad", GOOD.replace('name = "x"', 'name = "bad"').replace("priority = 1\n", ""))
    with pytest.raises(ProfileError, match="bad.toml: missing field 'priority'"):
        load_profiles(tmp_path)
    with pytest.raises(ProfileError, match="no \\*.toml"):
        load_profiles(tmp_path / "empty")


def test_pick_hopper_fp8(profiles):
    assert pick(H100, 16 * GB, H100.total_memory_bytes, profiles).name == "hopper-fp8"
    assert pick(L40S, 16 * GB, L40S.total_memory_bytes, profiles).name == "ada-fp8"


def test_pick_ampere(profiles):
    assert pick(A100_40, 16 * GB, A100_40.total_memory_bytes, profiles).name == "ampere-int8-sq"
    big = pick(A100_40, 140 * GB, A100_40.total_memory_bytes, profiles)
    assert big.name == "any-gpu-int4-awq" and big.precision == "int4-awq"


def test_huge_model_on_hopper_falls_back_to_int4(profiles):
    # 180 GB bf16 -> 90 GB fp8: over 90% of 80 GiB; 46 GB int4 fits.
    assert pick(H100, 140 * GB, H100.total_memory_bytes, profiles).name == "hopper-fp8"
    assert pick(H100, 180 * GB, H100.total_memory_bytes, profiles).name == "any-gpu-int4-awq"


def test_t4_gets_no_fp8_or_int8_and_says_why(profiles):
    by_name = {p.name: p for p in profiles}
    ok, reason = supported_on(by_name["hopper-fp8"], T4)
    assert not ok and "SM >= 90" in reason and "SM 75" in reason
    ok, reason = supported_on(by_name["ampere-int8-sq"], T4)
    assert not ok and "SM >= 80" in reason and "SM 75" in reason
    choice = pick(T4, 2 * GB, T4.total_memory_bytes, profiles)
    assert choice.precision not in ("fp8", "int8-sq") and choice.name == "gpu-bf16"


def test_cpu_profiles_not_on_gpu_and_gpu_profiles_not_on_cpu(profiles):
    by_name = {p.name: p for p in profiles}
    assert supported_on(by_name["cpu-int8"], H100) == (False, "CPU-only profile")
    assert supported_on(by_name["hopper-fp8"], SPR) == (False, "needs a CUDA GPU")
    assert supported_on(by_name["cpu-bf16"], SPR)[0]
    ok, reason = supported_on(by_name["cpu-bf16"], SMALL_CPU)
    assert not ok and "avx512_bf16 or amx_bf16" in reason


def test_pick_cpu(profiles):
    assert pick(SPR, 2 * GB, SPR.total_memory_bytes, profiles).name == "cpu-int8"
    assert pick(SMALL_CPU, 0.3 * GB, SMALL_CPU.total_memory_bytes, profiles).name == "cpu-int8"
    # 16 GB bf16 -> 8 GB int8 weights: more than half of 8 GiB RAM, so int4.
    assert pick(SMALL_CPU, 16 * GB, SMALL_CPU.total_memory_bytes, profiles).name == "cpu-int4"
    assert pick(SMALL_CPU, 140 * GB, SMALL_CPU.total_memory_bytes, profiles).name == "cpu-int4"
