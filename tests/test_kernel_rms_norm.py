"""The RMSNorm kernel rounds like transformers' LlamaRMSNorm in bf16 and stays within a few ulps of it in fp32;
other dtypes take F.rms_norm."""

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


@pytest.mark.skipif(not kernel.available(), reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("rows, hidden", [(1, 576), (3, 64), (5, 100), (1, 4096), (130, 576)])
def test_float32_kernel_matches_transformers(rows, hidden, monkeypatch):
    torch.manual_seed(rows * hidden + 1)
    x = torch.randn(rows, hidden) * 4
    w = torch.randn(hidden)
    ref, torch_op = hf_rms_norm(x, w, 1e-5), F.rms_norm(x, (hidden,), w, 1e-5)
    monkeypatch.setattr(F, "rms_norm", None)  # the kernel, not the fallback, must answer
    y = kernel.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32
    # only the mean of squares sums in another order: a few fp32 ulps
    torch.testing.assert_close(y, ref, rtol=2**-20, atol=1e-6)
    torch.testing.assert_close(y, torch_op, rtol=2**-20, atol=1e-6)


def test_float16_takes_f_rms_norm_exactly():
    x, w = torch.randn(4, 64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
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


@pytest.mark.skipif(not kernel.available(), reason="no C++ toolchain for the kernel")
@pytest.mark.parametrize("rows, hidden", [(1, 576), (3, 40), (130, 576)])
def test_add_rms_norm_float32_equals_add_then_norm(rows, hidden, monkeypatch):
    torch.manual_seed(rows + hidden + 1)
    x, d, w = torch.randn(rows, hidden) * 3, torch.randn(rows, hidden), torch.randn(hidden)
    monkeypatch.setattr(F, "rms_norm", None)  # the kernel, not the fallback, must answer
    s, y = kernel.add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(s, x + d)  # one fp32 add, as torch's
    assert torch.equal(y, kernel.rms_norm(x + d, w, 1e-6))
    torch.testing.assert_close(y, hf_rms_norm(x + d, w, 1e-6), rtol=2**-20, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_mixed_dtypes_take_the_torch_ops():
    x, d, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64, dtype=torch.bfloat16)
    s, y = kernel.add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(s, x + d) and torch.equal(y, F.rms_norm(x + d, (64,), w, 1e-6))
