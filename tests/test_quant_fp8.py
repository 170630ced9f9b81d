"""FP8 E4M3 weights and activations."""

import torch

from engines.quant.calibrators import minmax
from engines.quant.fp8 import FP8_DTYPE, quantize_fp8
from tests.quant_reference import activation_scale, dequantize_fp8, fp8_linear_reference, quantize_fp8_activation


def _rows_of_different_magnitude():
    torch.manual_seed(0)
    return torch.randn(16, 64) * torch.logspace(-4, 1, 16).unsqueeze(1)


def test_round_trip_relative_error_small_in_normal_range():
    w = _rows_of_different_magnitude()
    w_fp8, scale = quantize_fp8(w, per_channel=True)
    assert w_fp8.dtype == FP8_DTYPE and scale.shape == (16, 1)
    assert torch.allclose(scale.squeeze(1), w.abs().amax(1) / 448)
    deq = dequantize_fp8(w_fp8, scale)
    normal = (w / scale).abs() >= 2.0**-6  # E4M3's smallest normal
    rel = ((deq - w).abs() / w.abs())[normal]
    assert rel.max() < 0.07  # 3 mantissa bits: half an ulp is 2^-4 = 6.25%
    assert torch.isfinite(deq).all()


def test_per_channel_beats_per_tensor_on_rows_of_different_magnitude():
    w = _rows_of_different_magnitude()
    errs = {}
    for per_channel in (True, False):
        w_fp8, scale = quantize_fp8(w, per_channel=per_channel)
        rel_rows = (dequantize_fp8(w_fp8, scale) - w).norm(dim=1) / w.norm(dim=1)
        errs[per_channel] = rel_rows.max()  # the smallest rows fall into subnormals per tensor
    assert errs[True] < errs[False] / 4


def test_fp8_linear_with_static_activation_scale():
    torch.manual_seed(0)
    x, w = torch.randn(8, 64), torch.randn(32, 64) * 0.1
    x_scale = activation_scale(minmax(x))
    w_fp8, w_scale = quantize_fp8(w)
    y = fp8_linear_reference(x, w_fp8, w_scale, x_scale)
    ref = x @ w.t()
    assert y.shape == ref.shape
    assert (y - ref).norm() / ref.norm() < 0.05
    # per-tensor weight scale path as well
    w8t, s_t = quantize_fp8(w, per_channel=False)
    assert (fp8_linear_reference(x, w8t, s_t, x_scale) - ref).norm() / ref.norm() < 0.05
    # activations beyond the calibrated amax saturate instead of becoming NaN
    big = quantize_fp8_activation(x * 100, x_scale)
    assert torch.isfinite(big.float()).all() and big.float().abs().max() == 448
