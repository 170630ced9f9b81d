"""engines/torch/kernels/panel_linear: GGUF Q4_1 codes in 16-row panels against bf16 x. The layout holds every code
where the kernel reads it; the sums are those of the unrounded weights within fp32 rounding of a float64 reference;
each row's result depends on nothing else in x (one row alone, any step size, prompt or decode); and the affine
int4 layer sends every bf16 row there on a CPU that has it."""

from __future__ import annotations

import pytest
import torch

from engines.torch import step_rows
from engines.torch.kernels import int_linear, panel_linear
from engines.torch.layers.affine_int4 import AffineInt4Linear

G = 32
SHAPES = [(960, 576), (576, 1536), (3072, 576), (16, 32), (48, 96)]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not panel_linear.available():
        pytest.skip("panel_linear needs AVX512-BF16 (and a compiler); int_gemv's kernels serve here")


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
    """The layout read back as panel_linear.cpp's comment describes it, written independently of pack."""
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
    codes, dmp = panel_linear.pack_q4_1(u, dm)
    assert codes.data_ptr() % 64 == 0 and dmp.data_ptr() % 64 == 0
    back_u, back_dm = unpack(codes, dmp)
    assert torch.equal(back_u, u) and torch.equal(back_dm, dm)


def test_pack_refuses_shapes_the_kernel_cannot_take():
    u, dm = blocks(24, 64, seed=1)
    with pytest.raises(ValueError, match="N % 16 == 0"):
        panel_linear.pack_q4_1(u, dm)
    assert (
        not panel_linear.fits_q4_1(24, 64, 32)
        and not panel_linear.fits_q4_1(32, 64, 64)
        and panel_linear.fits_q4_1(32, 64, 32)
    )


@pytest.mark.parametrize("m", [1, 2, 4, 11, 12, 13, 32, 37])
@pytest.mark.parametrize("n,k", SHAPES)
def test_sums_the_unrounded_weights_within_fp32_rounding(n, k, m):
    """sum_g d_g (u_g . x_g) + m_g X_g against float64 on the file's weights: within the fp32 roundings of those
    terms and one bf16 rounding of the output; a d off by one float16 step breaks the bound."""
    u, dm = blocks(n, k, seed=3 * n + k + m)
    codes, dmp = panel_linear.pack_q4_1(u, dm)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
    y = panel_linear.q4_1_linear(x, codes, dmp, bias)
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
    codes, dmp = panel_linear.pack_q4_1(u, dm)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = panel_linear.q4_1_linear(x, codes, dmp)
    alone = torch.cat([panel_linear.q4_1_linear(x[i : i + 1], codes, dmp) for i in range(40)])
    assert torch.equal(y, alone)
    assert torch.equal(panel_linear.q4_1_linear(x.view(4, 10, k), codes, dmp), y.view(4, 10, n))


def test_is_closer_to_the_file_than_the_bf16_rounded_weights():
    """The point of computing with the codes: over many outputs the error against the float32 model is smaller than
    that of int_gemv's kernel, which multiplies by the weights rounded to bf16."""
    n, k = 576, 1536
    u, dm = blocks(n, k, seed=9)
    codes, dmp = panel_linear.pack_q4_1(u, dm)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(4)).bfloat16()
    ref = x.double() @ weights(u, dm).T
    ours = panel_linear.q4_1_linear(x, codes, dmp)
    rounded = int_linear.int4_affine_linear(x, int_linear.pack_int4(u.to(torch.int8) - 8), dm, G)
    assert (ours.double() - ref).abs().mean() < (rounded.double() - ref).abs().mean()


def test_refuses_what_it_cannot_read():
    u, dm = blocks(32, 64, seed=2)
    codes, dmp = panel_linear.pack_q4_1(u, dm)
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        panel_linear.q4_1_linear(torch.randn(1, 64), codes, dmp)
    with pytest.raises(RuntimeError, match="x must be \\[..., K\\] with K = 64"):
        panel_linear.q4_1_linear(torch.randn(1, 96).bfloat16(), codes, dmp)
    with pytest.raises(RuntimeError, match="dm must be contiguous float16"):
        panel_linear.q4_1_linear(torch.randn(1, 64).bfloat16(), codes, dmp.float())
    with pytest.raises(RuntimeError, match="bias must be a float CPU tensor with N elements"):
        panel_linear.q4_1_linear(torch.randn(1, 64).bfloat16(), codes, dmp, torch.zeros(31))
    assert panel_linear.q4_1_linear(torch.randn(0, 64).bfloat16(), codes, dmp).shape == (0, 32)


def test_the_layer_sends_every_bf16_row_to_the_panels(monkeypatch):
    """Decode rows, prompt rows, a mixed step and rows outside a step: one panels call each, the same bits for a row
    whatever shares its step. float32 x keeps int_gemv's kernel (the panels are bf16 only)."""
    n, k = 96, 576
    u, dm = blocks(n, k, seed=6)
    layer = AffineInt4Linear(int_linear.pack_int4(u.to(torch.int8) - 8), dm, G)
    assert layer.panel_codes is not None
    calls = []
    linear = panel_linear.q4_1_linear
    monkeypatch.setattr(panel_linear, "q4_1_linear", lambda x, *a: calls.append(x.shape[0]) or linear(x, *a))
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


# ----------------------------------------------------------------------------------------------------------------
# int8 per-channel codes
# ----------------------------------------------------------------------------------------------------------------

INT8_SHAPES = [(16, 32), (48, 96), (960, 576), (576, 1536)]


def int8_codes(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) * 0.01 + 1e-4


@pytest.mark.parametrize("n,k", INT8_SHAPES)
def test_int8_one_hot_rows_read_every_code_in_place(n, k):
    """A one-hot x picks one column of q * s out of the kernel, rounded once: every column of the first 32-column
    block (each position of the widening's transpose) and of the last one, for every row of W."""
    q, s = int8_codes(n, k, seed=n + k)
    cols = sorted(set(range(32)) | set(range(k - 32, k)))
    x = torch.zeros(len(cols), k, dtype=torch.bfloat16)
    x[torch.arange(len(cols)), cols] = 1
    y = panel_linear.int8_linear(x, q, s)
    assert torch.equal(y, (q[:, cols].float() * s[:, None]).T.bfloat16())


@pytest.mark.parametrize("m", [1, 12, 13, 40, 100])
@pytest.mark.parametrize("n,k", INT8_SHAPES)
def test_int8_sums_within_fp32_rounding_then_the_layers_epilogue(n, k, m):
    """q . x in fp32, rounded to bf16, times s, plus bias, rounded to bf16: within those roundings of float64."""
    q, s = int8_codes(n, k, seed=n * k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
    y = panel_linear.int8_linear(x, q, s, bias)
    dot = x.double() @ q.double().T
    ref = dot * s.double() + bias.double()
    bound = (k / 16 + 8) * 2.0**-24 * (x.double().abs() @ q.double().abs().T) * s.double() + 2.0**-7 * ref.abs()
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    excess = ((y.double() - ref).abs() - bound - 2.0**-8 * bias.double().abs()).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess}"


def test_int8_each_row_is_computed_alone():
    q, s = int8_codes(960, 576, seed=3)
    x = torch.randn(120, 576, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = panel_linear.int8_linear(x, q, s)
    alone = torch.cat([panel_linear.int8_linear(x[i : i + 1], q, s) for i in range(0, 120, 7)])
    assert torch.equal(alone, y[::7])
    assert torch.equal(panel_linear.int8_linear(x.view(3, 40, 576), q, s), y.view(3, 40, 960))


def test_int8_refuses_what_it_cannot_read():
    q, s = int8_codes(32, 64, seed=2)
    with pytest.raises(RuntimeError, match="N a multiple of 16 and K of 32"):
        panel_linear.int8_linear(torch.randn(1, 64).bfloat16(), q[:24].contiguous(), s[:24])
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        panel_linear.int8_linear(torch.randn(1, 64).bfloat16(), q, s.double())
    with pytest.raises(RuntimeError, match="x must be a bfloat16"):
        panel_linear.int8_linear(torch.randn(1, 64), q, s)
    assert not panel_linear.fits_int8(24, 64) and not panel_linear.fits_int8(32, 48) and panel_linear.fits_int8(32, 64)


def test_the_int8_layer_sends_a_few_decode_rows_to_int_gemv_and_the_rest_to_the_panels(monkeypatch):
    """Decode steps under INT8_MIN_ROWS rows: int_gemv's kernel (it streams the codes once); larger decode steps and
    prompt rows: the panels. Outside a step (the LM head) the row count decides the same way; float32 x keeps the old
    paths."""
    from engines.torch.layers.quantized import Int8WeightOnlyLinear

    q, s = int8_codes(96, 576, seed=4)
    layer = Int8WeightOnlyLinear(q, s)
    assert layer.panels
    calls = []
    panels, kernel = panel_linear.int8_linear, int_linear.int8_linear
    monkeypatch.setattr(
        panel_linear, "int8_linear", lambda x, *a: calls.append(("panels", x.shape[0])) or panels(x, *a)
    )
    monkeypatch.setattr(int_linear, "int8_linear", lambda x, *a: calls.append(("kernel", x.shape[0])) or kernel(x, *a))
    few = panel_linear.INT8_MIN_ROWS - 1
    x = torch.randn(few + 20, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
    with step_rows.step(few + 20, few):
        mixed = layer(x)
    with step_rows.step(few + 20, few + 20):
        layer(x)
    layer(x[:few])
    layer(x)
    assert calls == [("kernel", few), ("panels", 20), ("panels", few + 20), ("kernel", few), ("panels", few + 20)]
    with step_rows.step(20, 0):
        assert torch.equal(layer(x[few:]), mixed[few:])  # a prompt's rows alike whatever shares the step
    calls.clear()
    layer(x.float())
    assert ("panels", few + 20) not in calls


def test_on_an_amx_cpu_q4_1_prompt_rows_keep_the_gemm(monkeypatch):
    """Where oneDNN runs bf16 GEMMs on AMX tiles, a prompt outruns the panels there: the layer then sends a step's
    decode rows to the panels and its prompt rows to the dequantized GEMM (bf16-rounded weights), by the step."""
    from engines.torch.kernels import amx_linear

    monkeypatch.setattr(amx_linear, "available", lambda: True)
    u, dm = blocks(96, 576, seed=8)
    layer = AffineInt4Linear(int_linear.pack_int4(u.to(torch.int8) - 8), dm, G)
    assert layer.prompts_on_amx
    calls = []
    linear = panel_linear.q4_1_linear
    monkeypatch.setattr(panel_linear, "q4_1_linear", lambda x, *a: calls.append(x.shape[0]) or linear(x, *a))
    x = torch.randn(10, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    with step_rows.step(10, 4):
        mixed = layer(x)
    assert calls == [4]
    rounded = int_linear.int4_affine_dequantize(layer.packed, dm, G, 576, torch.bfloat16)
    assert torch.equal(mixed[4:], torch.nn.functional.linear(x[4:], rounded))
