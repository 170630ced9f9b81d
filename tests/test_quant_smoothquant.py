"""SmoothQuant smoothing and the W8A8 reference linear."""

import pytest
import torch

from engines.quant.calibrators import RangeObserver
from engines.quant.smoothquant import dynamic_quantize_per_token, quantize_w8a8, smooth_scales
from tests.quant_reference import apply_smoothing, w8a8_linear_reference


def _outlier_layer():
    torch.manual_seed(0)
    k, n = 128, 64
    x = torch.randn(96, k)
    x[:, [3, 40, 77, 100]] *= 50  # a few outlier channels, as in LLM activations
    norm_w = torch.rand(k) + 0.5
    w_q, w_k = torch.randn(n, k) * 0.05, torch.randn(n // 2, k) * 0.05
    return x, norm_w, [w_q, w_k]


def test_folding_keeps_float_product():
    x, norm_w, ws = _outlier_layer()
    h = torch.randn(x.shape[0], x.shape[1])  # pre-norm input: the norm output is h * norm_w
    obs = RangeObserver()
    obs.update(h * norm_w)
    s = smooth_scales(obs.amax, ws, alpha=0.5)
    assert s.shape == (x.shape[1],) and (s > 0).all()
    norm_s, ws_s = apply_smoothing(norm_w, ws, s)
    for w, w_s in zip(ws, ws_s):
        assert torch.allclose((h * norm_s) @ w_s.t(), (h * norm_w) @ w.t(), atol=1e-5, rtol=1e-4)
    # a single weight comes back as a single weight
    _, w_single = apply_smoothing(norm_w, ws[0], s)
    assert isinstance(w_single, torch.Tensor)


def test_smoothing_lowers_w8a8_error_with_outlier_channels():
    x, norm_w, ws = _outlier_layer()
    w = ws[0]
    ref = x @ w.t()
    qw, sw = quantize_w8a8(w)
    err_off = (w8a8_linear_reference(x, qw, sw) - ref).norm() / ref.norm()
    obs = RangeObserver()
    obs.update(x)
    s = smooth_scales(obs.amax, ws, alpha=0.5)
    qw_s, sw_s = quantize_w8a8(w * s)
    err_on = (w8a8_linear_reference(x / s, qw_s, sw_s) - ref).norm() / ref.norm()
    print(f"smoothquant rel err on/off: {err_on:.4f}/{err_off:.4f} ratio {err_on / err_off:.3f}")
    assert err_on < 0.5 * err_off


@pytest.mark.parametrize("m,k,n", [(32, 64, 24), (4, 64, 24), (32, 60, 20)])
def test_w8a8_linear_int_mm_and_fallback_agree_with_dequantized_math(m, k, n):
    torch.manual_seed(1)
    x, w = torch.randn(m, k), torch.randn(n, k)
    qw, sw = quantize_w8a8(w)
    xq, xs = dynamic_quantize_per_token(x)
    expected = (xq.double() * xs.double()) @ (qw.double() * sw.double()[:, None]).t()
    y = w8a8_linear_reference(x, qw, sw)
    assert y.shape == (m, n)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert (y - x @ w.t()).norm() / (x @ w.t()).norm() < 0.02
