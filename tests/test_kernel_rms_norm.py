"""The bf16 RMSNorm kernel rounds like transformers' LlamaRMSNorm; other dtypes take F.rms_norm."""

import pytest
import torch
import torch.nn.functional as F

from engines.torch.kernels import rms_norm as kernel


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
