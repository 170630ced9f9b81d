"""engines/torch/kernels/int_linear's affine int4 codes (w = d * u + m per group of 32, GGUF's Q4_1): the
dequantizer gives ggml's values exactly, the decode kernel multiplies by exactly those weights (bf16-rounded for bf16
x) at every ISA level and with or without the AVX512-BF16 dot products, and its sums are within fp32 rounding of a
float64 reference."""

from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import int_linear as kmod
from engines.torch.kernels import panel_linear
from engines.torch.kernels.int_linear import int4_affine_dequantize, int4_affine_linear, pack_int4
from engines.torch.layers.affine_int4 import AffineInt4Linear
from tests.isa_helpers import dot_path, isa_level_fixture  # noqa: F401 (dot_path: a fixture)

G = 32
SHAPES = [(960, 576), (576, 1536), (33, 96), (100, 160), (17, 32)]  # K % 64 == 32: a padded half chunk

isa_level = isa_level_fixture(kmod._EXT)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not kmod.available():
        pytest.skip("int_linear kernels unavailable (neither AVX-512 F/BW/VL nor AVX2, or no compiler or ninja)")


@pytest.fixture
def no_panels(monkeypatch):
    """Layers built here route as on a CPU without panel_linear (bf16 x there takes int_gemv's kernel and the GEMM;
    tests/test_kernel_panel_linear.py covers the layers that have it)."""
    monkeypatch.setattr(panel_linear, "available", lambda: False)


def codes(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, dm, u): random codes and float16-valued (d, m) pairs shaped like trained Q4_1 blocks."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
    d = (torch.rand(n, k // G, generator=g) * 0.01 + 1e-4).half().float()
    m = (-d * 8 + torch.randn(n, k // G, generator=g) * 1e-3).half().float()
    return pack_int4(u - 8), torch.stack([d, m], dim=-1).half().contiguous(), u


def ggml_values(u: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """gguf-py's Q4_1 dequantization, (d * u) + m in float32: a multiply, then an add."""
    n, k = u.shape
    d, m = (dm[..., i].float().repeat_interleave(G, dim=1) for i in (0, 1))
    return (d * u.float()) + m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantize_gives_ggml_values(n, k, dtype, dot_path):
    packed, dm, u = codes(n, k, seed=n + k)
    assert torch.equal(int4_affine_dequantize(packed, dm, G, k, dtype), ggml_values(u, dm).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_decode_multiplies_by_the_dequantized_weights(n, k, dtype, dot_path):
    """A row of x with one nonzero c picks one column of the weight out of the kernel: a single product, no sum to
    round. c is not a power of two, so for bf16 x the exact fp32 weights would round differently."""
    packed, dm, _ = codes(n, k, seed=7 * n + k)
    w = int4_affine_dequantize(packed, dm, G, k, dtype).float()
    exact = int4_affine_dequantize(packed, dm, G, k, torch.float32)
    c = 1 + 2**-7  # exact in bf16
    for col in sorted({0, k // 2 + 1, k - 1}):
        x = torch.zeros(1, k, dtype=dtype)
        x[0, col] = c
        assert torch.equal(int4_affine_linear(x, packed, dm, G)[0], (c * w[:, col]).to(dtype)), col
    if dtype == torch.bfloat16 and n * k > 1000:  # the check tells the rounded weights from the exact ones
        assert not torch.equal((c * w).to(dtype), (c * exact).to(dtype))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_sums_are_within_fp32_rounding_of_float64(n, k, m, dtype, dot_path):
    packed, dm, _ = codes(n, k, seed=n * k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
    w = int4_affine_dequantize(packed, dm, G, k, dtype).double()
    y = int4_affine_linear(x, packed, dm, G, bias)
    ref = x.double() @ w.T + bias.double()
    # fp32 sums of K exact products in some fixed order: a few K/16 roundings of sum |x w|; bf16 adds its rounding
    bound = (k / 16 + 8) * 2.0**-24 * (x.double().abs() @ w.abs().T + bias.double().abs())
    if dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * ref.abs()
    assert y.dtype == dtype and y.shape == (m, n)
    excess = ((y.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_large_steps_use_the_same_weights_as_decode(dtype, dot_path, no_panels):
    """Prefill-sized steps dequantize once and run F.linear: with one-hot rows, the same columns as the kernel."""
    n, k = 96, 576
    packed, dm, _ = codes(n, k, seed=3)
    layer = AffineInt4Linear(packed, dm, G)
    rows = kmod.SMALL_M_MAX_INT4 + 8
    x = torch.zeros(rows, k, dtype=dtype)
    x[torch.arange(rows), torch.arange(rows) * 7] = 1
    large = layer(x)
    decode = torch.cat([layer(x[i : i + 8]) for i in range(0, rows, 8)])
    assert torch.equal(large, decode)


def test_kernel_refuses_bad_pairs():
    packed, dm, _ = codes(16, 64, seed=1)
    with pytest.raises(RuntimeError, match="dm must be contiguous float16"):
        int4_affine_linear(torch.randn(1, 64), packed, dm.float(), G)
    with pytest.raises(RuntimeError, match="dm must be contiguous float16"):
        int4_affine_linear(torch.randn(1, 64), packed, dm[:, :1].contiguous(), G)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_steps_decode_rows_take_the_kernel_and_its_prompt_rows_the_gemm(dtype, dot_path, no_panels, monkeypatch):
    """Inside a step (engines/torch/step_rows.py) the kernel gets exactly the decode rows, however few prompt rows
    share the step, and a prompt row gets the dequantized GEMM however few there are. In bf16 each row's result is
    what it gets in a step of its own kind (oneDNN's bf16 GEMM rows do not depend on one another, the kernel is
    batch-invariant); float32 GEMMs may pick another kernel for another row count, so there only within rounding.
    Outside a step the row count decides, as before."""
    from engines.torch import step_rows

    n, k = 96, 576
    packed, dm, _ = codes(n, k, seed=5)
    layer = AffineInt4Linear(packed, dm, G)
    calls = []
    kernel = kmod.int4_affine_linear
    monkeypatch.setattr(kmod, "int4_affine_linear", lambda x, *a: calls.append(x.shape[0]) or kernel(x, *a))
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    with step_rows.step(7, 3):
        mixed = layer(x)
    assert calls == [3]
    with step_rows.step(3, 3):
        decode = layer(x[:3])
    with step_rows.step(2, 0):
        prompt = [layer(x[3:5])]
    with step_rows.step(2, 0):
        prompt.append(layer(x[5:]))
    assert calls == [3, 3]
    alone = torch.cat([decode, *prompt])
    assert torch.equal(mixed[:3], decode)
    if dtype == torch.bfloat16:
        assert torch.equal(mixed, alone)
    else:
        torch.testing.assert_close(mixed, alone, rtol=1e-6, atol=1e-6)
    calls.clear()
    layer(x[:1])
    layer(torch.zeros(kmod.SMALL_M_MAX_INT4 + 1, k, dtype=dtype))
    assert calls == [1]
