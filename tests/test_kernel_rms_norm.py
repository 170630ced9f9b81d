"""The bf16 RMSNorm kernel rounds like transformers' LlamaRMSNorm; other dtypes take F.rms_norm."""

import pytest
import torch
import torch.nn.functional as F

from engines.torch.kernels import rms_norm as kernel
from tests.isa_helpers import isa_level_fixture

isa_level = isa_level_fixture(kernel._EXT)  # every test below, once per ISA level this CPU has


def hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * normed.to(x.dtype)


@pytest.mark.skipif(not kernel.available(), reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("rows, hidden", [(1, 576), (3, 64), (5, 100), (1, 4096)])
def test_bf16_kernel_equals_transformers_rounding(rows, hidden):
    torch.manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, dtype=torch.bfloat16) * 4
    w = torch.randn(hidden, dtype=torch.bfloat16)
    y = kernel.rms_norm(x, w, 1e-5)
    ref = hf_rms_norm(x, w, 1e-5)
    # the mean of squares may sum in another order: at most one bf16 ulp of difference, almost always none
    assert (y.float() - ref.float()).abs().le(ref.float().abs() * 2**-7 + 1e-6).all()
    assert (y == ref).float().mean() > 0.99


def test_float32_takes_f_rms_norm_exactly():
    x, w = torch.randn(4, 64), torch.randn(64)
    assert torch.equal(kernel.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))


@pytest.mark.skipif(not kernel.available(), reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("rows, hidden", [(1, 576), (3, 40), (130, 576), (2, 4096)])
def test_add_rms_norm_equals_add_then_norm(rows, hidden):
    torch.manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, dtype=torch.bfloat16) * 3
    d = torch.randn(rows, hidden, dtype=torch.bfloat16)
    w = torch.randn(hidden, dtype=torch.bfloat16)
    s, y = kernel.add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(s, x + d)  # torch's bf16 add, bit for bit
    assert torch.equal(y, kernel.rms_norm(x + d, w, 1e-5))


def test_add_rms_norm_float32_is_the_two_ops():
    x, d, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    s, y = kernel.add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(s, x + d) and torch.equal(y, F.rms_norm(x + d, (64,), w, 1e-6))
