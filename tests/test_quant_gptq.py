"""GPTQ against round-to-nearest, act_order, dead columns and block-size invariance."""

import pytest
import torch

from engines.quant.gptq import gptq_quantize
from engines.quant.rtn import dequantize, quantize_rtn
from tests.quant_helpers import output_error, salient_layer


@pytest.mark.parametrize("group_size,act_order", [(64, False), (128, False), (128, True), (64, True)])
def test_gptq_int4_beats_rtn(group_size, act_order):
    x, w = salient_layer()
    qw = gptq_quantize(w, x, bits=4, group_size=group_size, act_order=act_order)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == w.shape
    assert qw.scales.shape == (128, 256 // group_size) and qw.zeros.shape == qw.scales.shape
    assert int(qw.qweight.min()) >= -8 and int(qw.qweight.max()) <= 7
    assert (qw.g_idx is not None) == act_order
    if act_order:
        assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((256 // group_size,), group_size))
    e_gptq = output_error(x, w, dequantize(qw))
    e_rtn = output_error(x, w, dequantize(quantize_rtn(w, 4, group_size, symmetric=False)))
    print(f"GPTQ/RTN g{group_size} act_order={act_order}: {e_gptq / e_rtn:.3f}")
    assert e_gptq < 0.85 * e_rtn


def test_gptq_symmetric_per_channel_and_small_blocks():
    x, w = salient_layer()
    e_rtn = output_error(x, w, dequantize(quantize_rtn(w, 4, None, symmetric=True)))
    errs = []
    for blocksize in (32, 128):  # lazy batch updates are exact: block size must not change the result
        qw = gptq_quantize(w, x, bits=4, group_size=None, symmetric=True, blocksize=blocksize)
        assert qw.zeros is None and qw.scales.shape == (128, 1)
        errs.append(output_error(x, w, dequantize(qw)))
    assert errs[0] < 0.85 * e_rtn
    assert abs(errs[0] - errs[1]) / errs[1] < 0.01


def test_gptq_dead_columns_and_hessian_input():
    x, w = salient_layer(k=64, n_out=16, n=64)
    x[:, 5] = 0  # a column never activated by calibration data
    qw = gptq_quantize(w, x, bits=4, group_size=32)
    deq = dequantize(qw)
    assert torch.isfinite(deq).all()
    assert (deq[:, 5] == 0).all()
    h = 2 * x.t() @ x / x.shape[0]
    assert torch.equal(gptq_quantize(w, h=h, bits=4, group_size=32).qweight, qw.qweight)


def test_gptq_rejects_bad_group_size():
    x, w = salient_layer(k=96, n_out=8, n=16)
    with pytest.raises(ValueError, match="divisor"):
        gptq_quantize(w, x, group_size=64)
