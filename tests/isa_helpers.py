"""Run a kernel's tests once per ISA level this machine has (isa_variants.LEVELS): the fixture `isa_level` forces
the kernel module to that level's build, as if load-time selection had chosen it."""

from __future__ import annotations

import pytest

from engines.torch.kernels import extension
from engines.torch.kernels.isa_variants import LEVELS, IsaVariants


def levels_here() -> list[str]:
    have = extension.cpu_flags()
    return [level.name for level in LEVELS if all(flag in have for flag in level.cpu_flags)]


def force_level(monkeypatch: pytest.MonkeyPatch, variants: IsaVariants, level: str) -> None:
    module = variants.variants[level].get()
    assert module is not None, f"{variants.variants[level].name} did not build on a CPU that has its flags"
    monkeypatch.setattr(variants, "module", module)
    monkeypatch.setattr(variants, "level", level)
    monkeypatch.setattr(variants, "decided_for", extension.cpu_flags())


def isa_level_fixture(variants: IsaVariants):
    """An autouse fixture for a kernel's test file: each of its tests runs at every level levels_here() lists."""

    @pytest.fixture(params=levels_here(), autouse=True)
    def isa_level(request, monkeypatch):
        force_level(monkeypatch, variants, request.param)
        return request.param

    return isa_level


@pytest.fixture(params=["bf16 dot", "fp32"])
def dot_path(request, monkeypatch):
    """Each test with int_gemv.cpp's AVX512-BF16 paths (dot tiles, dequantizer) on, where this CPU and level have
    them, and off."""
    from engines.torch.kernels.int_linear import BF16_DOT_FLAG

    flags = extension.cpu_flags()
    if request.param == "bf16 dot" and BF16_DOT_FLAG not in flags:
        pytest.skip("this CPU has no AVX512-BF16")
    if request.param == "fp32":
        monkeypatch.setattr(extension, "cpu_flags", lambda: flags - {BF16_DOT_FLAG})
    return request.param
