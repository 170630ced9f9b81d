"""Load-time choice among a kernel's ISA builds (isa_variants.py): the highest level whose CPU flags
extension.cpu_flags() reports, else the torch fallback; and the AVX-512 and AVX2 builds of one source give the
same bits where their order of operations is the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.torch.kernels import dispatch, extension, rms_norm, silu_mul
from engines.torch.kernels.isa_variants import LEVELS
from tests.cpu_classes import CPU_CLASSES
from tests.isa_helpers import levels_here

AVX512_CPU = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
AVX2_CPU = {"avx2", "fma", "f16c", "sse4_2"}
OLD_CPU = {"sse4_2", "avx"}  # no AVX2: no build of these kernels applies
# the ops with an AVX-512 and an AVX2 build
KERNEL_OPS = ("rms_norm", "silu_mul", "rope_kv", "argmax", "token_mask", "int_linear", "paged_attention")


def test_every_level_has_its_own_extension_name():
    names = [ext.name for ext in rms_norm._EXT.variants.values()]
    assert names == ["kiln_rms_norm", "kiln_rms_norm_avx2"]
    assert [level.name for level in LEVELS] == ["avx512", "avx2"]  # highest first


@pytest.mark.parametrize(
    "flags, level", [(AVX512_CPU, "avx512"), (AVX2_CPU, "avx2"), (AVX512_CPU - {"avx512bw"}, "avx2"), (OLD_CPU, None)]
)
def test_the_highest_level_the_cpu_has_is_chosen(flags, level, monkeypatch):
    if level is not None:
        assert level in levels_here(), f"this machine cannot build the {level} variant to check its selection"
    variants = rms_norm._EXT
    monkeypatch.setattr(extension, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(variants, "decided_for", None)
    monkeypatch.setattr(variants, "module", None)
    monkeypatch.setattr(variants, "level", None)
    chosen = variants.get()
    assert variants.level == level
    assert chosen is (variants.variants[level].get() if level else None)
    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    if level is None:  # the torch fallback, exactly
        assert torch.equal(rms_norm.rms_norm(x, w, 1e-5), F.rms_norm(x, (64,), w, 1e-5))


@pytest.mark.parametrize("dtype, bits_dtype", [(torch.bfloat16, torch.int16), (torch.float32, torch.int32)])
def test_silu_mul_builds_agree_bit_for_bit(dtype, bits_dtype):
    """exp's range reduction and 2^n scaling round alike at both widths (scalef vs two exact products)."""
    levels = levels_here()
    assert len(levels) >= 2, f"this machine runs only {levels}: nothing to compare"
    x = (torch.randn(9, 2 * 1000) * 30).to(dtype)  # past exp's clamps, into denormal results
    x[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 88.5, -88.5])
    bits = [silu_mul._EXT.variants[level].get().silu_mul(x).view(bits_dtype) for level in levels]
    assert all(torch.equal(bits[0], b) for b in bits[1:])


def test_kiln_cpu_isa_avx2_runs_the_avx2_builds(monkeypatch, kernels_decide_again):
    """The override restricts the flags extension.cpu_flags() reports; after extension.reset() every op decides
    again, and the dispatch report names the level each one then runs."""
    assert "avx512" in levels_here(), "this machine cannot show the override moving a kernel down a level"
    assert rms_norm._EXT.get() is rms_norm._EXT.variants["avx512"].get()
    monkeypatch.setenv("KILN_CPU_ISA", "avx2")
    extension.reset()
    assert rms_norm._EXT.get() is rms_norm._EXT.variants["avx2"].get() and rms_norm._EXT.level == "avx2"
    report = dispatch.report()
    for op in KERNEL_OPS:
        assert report[op] == "avx2", (op, report[op])


@pytest.mark.parametrize("name", list(CPU_CLASSES))
def test_dispatch_report_names_the_level_each_class_runs(name):
    flags, level = CPU_CLASSES[name]
    expected = "torch" if level is None else "avx2" if level == "avx2" else "avx512"
    report = dispatch.report(flags)
    assert {op: report[op] for op in KERNEL_OPS} == dict.fromkeys(KERNEL_OPS, expected)
