"""engines/torch/step_rows.py: the model's forward says which rows of its flat batch are decode rows, and the
weight-only int8 layer sends those to its decode kernel and the prompt rows to its GEMM, so that a prompt's rows are
computed the same way in a step of any size or mix (the affine int4 layer: tests/test_kernel_int4_affine.py)."""

from __future__ import annotations

import pytest
import torch

from engines.quant.rtn import quantize_rtn
from engines.torch import step_rows
from engines.torch.kernels import int_linear
from engines.torch.layers.quantized import Int8WeightOnlyLinear


def test_decode_rows_are_known_only_for_the_steps_own_rows():
    assert step_rows.decode_rows(7) is None
    with step_rows.step(7, 3):
        assert step_rows.decode_rows(7) == 3
        assert step_rows.decode_rows(2) is None  # an expert's or the LM head's rows
        with step_rows.step(4, 0):
            assert step_rows.decode_rows(4) == 0
        assert step_rows.decode_rows(7) == 3
    assert step_rows.decode_rows(7) is None


def test_route_splits_a_mixed_step_and_falls_back_to_the_row_count():
    seen = []

    def kernel(x):
        seen.append(("kernel", x.shape[0]))
        return x[:, :2] * 2

    def gemm(x):
        seen.append(("gemm", x.shape[0]))
        return x[:, :2] * 3

    x = torch.arange(5 * 4, dtype=torch.float32).view(5, 4)
    with step_rows.step(5, 2):
        y = step_rows.route(x, 4, 4, kernel, gemm)
    assert torch.equal(y, torch.cat([x[:2, :2] * 2, x[2:, :2] * 3])) and seen == [("kernel", 2), ("gemm", 3)]
    seen.clear()
    with step_rows.step(5, 5):
        step_rows.route(x, 4, 4, kernel, gemm)  # more decode rows than the kernel takes
    step_rows.route(x[:4], 4, 4, kernel, gemm)  # no step: by size
    step_rows.route(x, 4, 4, kernel, gemm)
    assert seen == [("gemm", 5), ("kernel", 4), ("gemm", 5)]


@pytest.mark.skipif(not int_linear.available(), reason="int_linear kernels unavailable")
def test_int8_layer_computes_prompt_rows_with_its_gemm_in_any_step(monkeypatch):
    w = torch.randn(96, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    layer = Int8WeightOnlyLinear.from_quantized(quantize_rtn(w, 8))
    layer.amx_packed = None  # the AVX-512 kernel and GEMM on any CPU (AMX has its own rows)
    calls = []
    kernel = int_linear.int8_linear
    monkeypatch.setattr(int_linear, "int8_linear", lambda x, *a: calls.append(x.shape[0]) or kernel(x, *a))
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
    with step_rows.step(9, 2):
        mixed = layer(x)
    with step_rows.step(7, 0):
        whole_prompt = layer(x[2:])
    with step_rows.step(3, 0):
        tail = layer(x[6:])  # the prompt's tail after a prefix-cache hit
    assert calls == [2]
    assert torch.equal(mixed[2:], whole_prompt) and torch.equal(whole_prompt[4:], tail)
    assert torch.equal(mixed[:2], layer(x[:2]))  # outside a step: two rows take the kernel
    assert calls == [2, 2]
