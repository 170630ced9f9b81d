"""The silu_mul kernel rounds like `F.silu(gate) * up` in bf16 and stays within a few ulps of it in fp32; other
dtypes take that torch code exactly."""

import pytest
import torch
import torch.nn.functional as F

from engines.torch.kernels import silu_mul as kernel
from tests.isa_helpers import isa_level_fixture

isa_level = isa_level_fixture(kernel._EXT)  # every test below, once per ISA level this CPU has


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.skipif(not kernel.available(), reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("rows, inter", [(1, 1536), (3, 40), (33, 1536)])
def test_bf16_kernel_matches_torch(rows, inter):
    torch.manual_seed(rows + inter)
    x = torch.randn(rows, 2 * inter, dtype=torch.bfloat16) * 4
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps and silu's zero
    y, ref = kernel.silu_mul(x), reference(x)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    # exp differs from torch's Sleef by an ulp or two in fp32: after bf16 rounding, one bf16 ulp at most, rarely
    assert (y.float() - ref.float()).abs().le(ref.float().abs() * 2**-7 + 1e-30).all()
    assert (y == ref).float().mean() > 0.99


@pytest.mark.skipif(not kernel.available(), reason="no C++ toolchain for the kernel")
def test_non_finite_values_propagate():
    x = torch.tensor([[float("nan"), float("inf"), 1.0, 2.0]], dtype=torch.bfloat16)
    y = kernel.silu_mul(x)
    assert torch.isnan(y[0, 0]) and y[0, 1] == float("inf") * 2.0


@pytest.mark.skipif(not kernel.available(), reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("rows, inter", [(1, 1536), (3, 40), (33, 1536)])
def test_float32_kernel_matches_torch(rows, inter, monkeypatch):
    torch.manual_seed(rows * inter)
    x = torch.randn(rows, 2 * inter) * 4
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    ref = reference(x)
    monkeypatch.setattr(F, "silu", None)  # the kernel, not the fallback, must answer
    y = kernel.silu_mul(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # exp differs from torch's Sleef by an ulp or two; the division and the product add one rounding each
    # (1e-30: silu(-100) is denormal after exp's clamp, ~1e-37 against torch's ~1e-42)
    assert (y - ref).abs().le(ref.abs() * 2**-20 + 1e-30).all()


def test_float16_takes_torch_exactly():
    x = torch.randn(4, 64, dtype=torch.float16)
    assert torch.equal(kernel.silu_mul(x), reference(x))
