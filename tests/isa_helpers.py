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
