"""engines/torch/kernels/q4_panels: GGUF Q4_1 codes in 16-row panels against bf16 x. The layout holds every code
where the kernel reads it; the sums are those of the unrounded weights within fp32 rounding of a float64 reference;
each row's result depends on nothing else in x (one row alone, any step size, prompt or decode); and the affine
int4 layer sends every bf16 row there on a CPU that has it."""

from __future__ import annotations

import pytest
import torch

from engines.torch import step_rows
from engines.torch.kernels import int_linear, q4_panels
from engines.torch.layers.affine_int4 import AffineInt4Linear

G = 32
SHAPES = [(960, 576), (576, 1536), (3072, 576), (16, 32), (48, 96)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not q4_panels.available():
        pytest.skip("q4_panels needs AVX512-BF16 (and a compiler); int_gemv's kernels serve Q4_1 here")


def blocks(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, dm): random codes 0..15 and float16 (d, m) pairs shaped like trained Q4_1 blocks."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = torch.rand(n, k // G, generator=g) * 0.01 + 1e-4
    m = -d * 8 + torch.randn(n, k // G, generator=g) * 1e-3
    return u, torch.stack([d, m], dim=-1).half()


def weights(u: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """The file's float32 weights, d * u + m (gguf-py's multiply then add), as float64."""
    d, m = (dm[..., i].float().repeat_interleave(G, dim=1) for i in (0, 1))
    return ((d * u.float()) + m).double()


def unpack(codes: torch.Tensor, dmp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout read back as q4_panels.cpp's comment describes it, written independently of pack."""
    nb, groups = codes.shape[:2]
    u = torch.empty(nb * 16, groups * G, dtype=torch.uint8)
    c = codes.view(nb, groups, 8, 16, 2)  # [panel, group, j, i, e]
    for j in range(8):
        for e in range(2):
            rows = c[:, :, j, :, e].permute(0, 2, 1).reshape(nb * 16, groups)  # [row, group]
            u[:, torch.arange(groups) * G + 4 * j + e] = rows & 15
            u[:, torch.arange(groups) * G + 4 * j + 2 + e] = rows >> 4
    dm = dmp.permute(0, 3, 1, 2).reshape(nb * 16, groups, 2)
    return u, dm


@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_puts_every_code_where_the_kernel_reads_it(n, k):
    u, dm = blocks(n, k, seed=n + k)
    codes, dmp = q4_panels.pack(u, dm)
    assert codes.data_ptr() % 64 == 0 and dmp.data_ptr() % 64 == 0
    back_u, back_dm = unpack(codes, dmp)
    assert torch.equal(back_u, u) and torch.equal(back_dm, dm)


def test_pack_refuses_shapes_the_kernel_cannot_take():
    u, dm = blocks(24, 64, seed=1)
    with pytest.raises(ValueError, match="N % 16 == 0"):
        q4_panels.pack(u, dm)
    assert not q4_panels.fits(24, 64, 32) and not q4_panels.fits(32, 64, 64) and q4_panels.fits(32, 64, 32)


@pytest.mark.parametrize("m", [1, 2, 4, 11, 12, 13, 32, 37])
@pytest.mark.parametrize("n,k", SHAPES)
def test_sums_the_unrounded_weights_within_fp32_rounding(n, k, m):
    """sum_g d_g (u_g . x_g) + m_g X_g against float64 on the file's weights: within the fp32 roundings of those
    terms and one bf16 rounding of the output; a d off by one float16 step breaks the bound."""
    u, dm = blocks(n, k, seed=3 * n + k + m)
    codes, dmp = q4_panels.pack(u, dm)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
    y = q4_panels.linear(x, codes, dmp, bias)
    ref = x.double() @ weights(u, dm).T + bias.double()
    dd, mm = (dm[..., i].double().repeat_interleave(G, dim=1) for i in (0, 1))
    terms = x.double().abs() @ (dd * u.double() + mm.abs()).T + bias.double().abs()
    bound = (k / 16 + 16) * 2.0**-24 * terms + 2.0**-8 * ref.abs()
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    excess = ((y.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess}"
    if n * k >= 960 * 576:  # the bound tells a wrong d from rounding
        off = dm.clone()
        off[..., 0] = (off[..., 0].float() * (1 + 2**-9)).half()
        wrong = x.double() @ weights(u, off).T + bias.double()
        assert ((y.double() - wrong).abs() - bound).max().item() > 0


@pytest.mark.parametrize("n,k", SHAPES[:3])
def test_each_row_is_computed_alone(n, k):
    """Batch invariance: any row's output is the same bits alone, in a step of 40 rows, or in a 3-D batch."""
    u, dm = blocks(n, k, seed=11)
    codes, dmp = q4_panels.pack(u, dm)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = q4_panels.linear(x, codes, dmp)
    alone = torch.cat([q4_panels.linear(x[i : i + 1], codes, dmp) for i in range(40)])
    assert torch.equal(y, alone)
    assert torch.equal(q4_panels.linear(x.view(4, 10, k), codes, dmp), y.view(4, 10, n))


def test_is_closer_to_the_file_than_the_bf16_rounded_weights():
    """The point of computing with the codes: over many outputs the error against the float32 model is smaller than
    that of int_gemv's kernel, which multiplies by the weights rounded to bf16."""
    n, k = 576, 1536
    u, dm = blocks(n, k, seed=9)
    codes, dmp = q4_panels.pack(u, dm)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(4)).bfloat16()
    ref = x.double() @ weights(u, dm).T
    ours = q4_panels.linear(x, codes, dmp)
    rounded = int_linear.int4_affine_linear(x, int_linear.pack_int4(u.to(torch.int8) - 8), dm, G)
    assert (ours.double() - ref).abs().mean() < (rounded.double() - ref).abs().mean()


def test_refuses_what_it_cannot_read():
    u, dm = blocks(32, 64, seed=2)
    codes, dmp = q4_panels.pack(u, dm)
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        q4_panels.linear(torch.randn(1, 64), codes, dmp)
    with pytest.raises(RuntimeError, match="x must be \\[..., K\\] with K = 64"):
        q4_panels.linear(torch.randn(1, 96).bfloat16(), codes, dmp)
    with pytest.raises(RuntimeError, match="dm must be contiguous float16"):
        q4_panels.linear(torch.randn(1, 64).bfloat16(), codes, dmp.float())
    with pytest.raises(RuntimeError, match="bias must be a float CPU tensor with N elements"):
        q4_panels.linear(torch.randn(1, 64).bfloat16(), codes, dmp, torch.zeros(31))
    assert q4_panels.linear(torch.randn(0, 64).bfloat16(), codes, dmp).shape == (0, 32)


def test_the_layer_sends_every_bf16_row_to_the_panels(monkeypatch):
    """Decode rows, prompt rows, a mixed step and rows outside a step: one panels call each, the same bits for a row
    whatever shares its step. float32 x keeps int_gemv's kernel (the panels are bf16 only)."""
    n, k = 96, 576
    u, dm = blocks(n, k, seed=6)
    layer = AffineInt4Linear(int_linear.pack_int4(u.to(torch.int8) - 8), dm, G)
    assert layer.panel_codes is not None
    calls = []
    linear = q4_panels.linear
    monkeypatch.setattr(q4_panels, "linear", lambda x, *a: calls.append(x.shape[0]) or linear(x, *a))
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    with step_rows.step(40, 3):
        mixed = layer(x)
    with step_rows.step(3, 3):
        decode = layer(x[:3])
    with step_rows.step(37, 0):
        prompt = layer(x[3:])
    single = layer(x[5:6])
    assert calls == [40, 3, 37, 1]
    assert torch.equal(mixed, torch.cat([decode, prompt])) and torch.equal(single, mixed[5:6])
    # the file's weights: a one-hot row reads one column of d * u + m, rounded once to bf16
    one_hot = torch.zeros(1, k, dtype=torch.bfloat16)
    one_hot[0, 7] = 1
    assert torch.equal(layer(one_hot)[0], weights(u, dm)[:, 7].float().bfloat16())
    calls.clear()
    table = []
    kernel = int_linear.int4_affine_linear
    monkeypatch.setattr(int_linear, "int4_affine_linear", lambda x, *a: table.append(x.shape[0]) or kernel(x, *a))
    layer(x[:2].float())
    assert calls == [] and table == [2]
