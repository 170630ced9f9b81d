"""Round-to-nearest quantization and INT4 packing."""

import pytest
import torch

from engines.quant.rtn import dequantize, pack_int4, quantize_rtn, unpack_int4


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(32, 128) * torch.logspace(-2, 0, 32).unsqueeze(1)


def test_pack_unpack_round_trip_signed_and_unsigned():
    torch.manual_seed(0)
    s = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    u = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    ps, pu = pack_int4(s), pack_int4(u)
    assert ps.dtype == torch.uint8 and ps.shape == (5, 32)
    assert torch.equal(unpack_int4(ps, signed=True), s)
    assert torch.equal(unpack_int4(pu, signed=False), u)
    # documented layout: element 0 in the low nibble, element 1 in the high nibble
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21
    assert pack_int4(torch.tensor([[-1, 0]], dtype=torch.int8)).item() == 0x0F


@pytest.mark.parametrize(
    "bits,group_size,symmetric",
    [(8, None, True), (4, None, True), (4, 32, True), (4, 32, False), (8, 64, False), (3, 16, True)],
)
def test_round_trip_error_bounded_by_half_scale(w, bits, group_size, symmetric):
    qw = quantize_rtn(w, bits, group_size=group_size, symmetric=symmetric)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == w.shape
    ngroups = 1 if group_size is None else w.shape[1] // group_size
    assert qw.scales.shape == (w.shape[0], ngroups)
    assert (qw.zeros is None) == symmetric
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(qw.qweight.min()) >= lo and int(qw.qweight.max()) <= hi
    g = w.shape[1] if group_size is None else group_size
    per_elem_scale = qw.scales.repeat_interleave(g, dim=1)
    err = (dequantize(qw) - w).abs()
    assert (err <= per_elem_scale / 2 * (1 + 1e-5) + 1e-7).all()


def test_int4_codes_pack_through_portable_layout(w):
    qw = quantize_rtn(w, 4, group_size=32, symmetric=False)
    assert torch.equal(unpack_int4(pack_int4(qw.qweight)), qw.qweight)


def test_group_size_must_divide_k(w):
    with pytest.raises(ValueError, match="divisor"):
        quantize_rtn(w, 4, group_size=48)


def test_int8_more_accurate_than_int4(w):
    e8 = (dequantize(quantize_rtn(w, 8)) - w).norm()
    e4 = (dequantize(quantize_rtn(w, 4)) - w).norm()
    assert e8 < e4 / 8


def test_bf16_weights_quantize_in_float32():
    torch.manual_seed(0)
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    qw = quantize_rtn(w, 4, group_size=32)
    assert qw.scales.dtype == torch.float32
    assert (dequantize(qw) - w.float()).abs().max() <= qw.scales.max() / 2 + 1e-6
