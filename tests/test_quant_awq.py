"""AWQ scale and clip search against round-to-nearest."""

import pytest
import torch

from engines.quant.awq import awq_quantize
from engines.quant.rtn import dequantize, quantize_rtn
from tests.quant_helpers import output_error, salient_layer


@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_int4_beats_rtn(group_size):
    x, w = salient_layer()
    res = awq_quantize(x, w, bits=4, group_size=group_size)
    (qw,) = res.qweights
    assert qw.bits == 4 and qw.group_size == group_size and qw.scales.shape == (128, 256 // group_size)
    assert res.scales.shape == (256,) and (res.scales > 0).all()
    assert 0.0 <= res.alpha < 1.0
    w_awq = dequantize(qw) / res.scales  # effective weight once 1/s is folded into the producer of x
    e_awq = output_error(x, w, w_awq)
    e_rtn = output_error(x, w, dequantize(quantize_rtn(w, 4, group_size, symmetric=False)))
    print(f"AWQ/RTN g{group_size}: {e_awq / e_rtn:.3f}")
    assert e_awq < 0.9 * e_rtn


def test_awq_group_of_linears_shares_one_scale():
    x, w = salient_layer()
    w2 = torch.randn(64, 256) * 0.05
    res = awq_quantize(x, [w, w2], bits=4, group_size=64, symmetric=True)
    assert len(res.qweights) == 2 and res.qweights[1].shape == (64, 256)
    for wi, qi, ratio in zip([w, w2], res.qweights, res.clip_ratios):
        assert ratio.shape == (wi.shape[0], 4) and (ratio >= 0.5).all() and (ratio <= 1.0).all()
        e_awq = output_error(x, wi, dequantize(qi) / res.scales)
        assert e_awq < output_error(x, wi, dequantize(quantize_rtn(wi, 4, 64, symmetric=True)))


def test_awq_rejects_bad_group_size():
    x, w = salient_layer(k=96, n_out=8, n=16)
    with pytest.raises(ValueError):
        awq_quantize(x, w, group_size=64)
