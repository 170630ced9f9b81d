"""`kiln serve` under KILN_CPU_ISA=avx2 on a better CPU: it serves as an AVX2 machine would, with int8 weights and
float32 activations for the defaults and no AVX-512 or AMX kernel, and says so in /v1/metadata."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from engines import cpu_isa

from .conftest import CLEAN_EXIT, start_server

pytestmark = pytest.mark.slow


def test_serve_forced_to_avx2_runs_as_an_avx2_machine(tmp_path):
    if "avx512" not in cpu_isa.levels_reached(cpu_isa.proc_cpu_flags()):
        pytest.fail("this test needs a CPU with AVX-512, to force down to AVX2")
    server = start_server(tmp_path, env={"KILN_CPU_ISA": "avx2"})
    try:
        metadata = httpx.get(f"{server.base_url}/v1/metadata", timeout=60).json()
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=120)
        answer = client.completions.create(model=metadata["model"], prompt="The capital of France is", max_tokens=8)
        assert metadata["precision"] == "int8-wo"  # on AVX2 the default GGUF model is served as int8 weights
        assert metadata["kv_cache_dtype"] == "float32"  # --dtype auto without native bf16: float32 activations
        assert "(avx2: avx2)" in metadata["hardware"]
        kernels = metadata["extra"]["cpu_kernels"]
        assert kernels and set(kernels.values()) <= {"avx2", "x86-64", "torch"}, kernels
        assert answer.choices[0].text
        assert "CPU kernels at ISA level avx2 (KILN_CPU_ISA; the CPU has " in server.log()
    finally:
        code = server.stop()
    assert code in CLEAN_EXIT, server.log()
