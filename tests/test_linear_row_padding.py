"""bf16 linear layers pad oneDNN's row counts to a few sizes per octave, which bounds oneDNN's per-shape kernel
cache (its growth was the soak's RSS growth): at most 25% more rows, a bounded set of sizes, and every output
row bit-identical to the unpadded call's."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from engines.torch.layers.linear import DenseLinear, LinearDispatch, onednn_rows


def test_row_sizes_are_few_and_close():
    sizes = {onednn_rows(m) for m in range(1, 513)}
    assert len(sizes) <= 40
    for m in range(1, 2049):
        assert m <= onednn_rows(m) <= max(m, 1.25 * m)


@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "F.linear"])
def test_padded_outputs_equal_unpadded_ones(prepack):
    torch.manual_seed(0)
    dispatch = LinearDispatch(torch.bfloat16, torch.device("cpu"))
    dispatch.prepack = dispatch.prepack and prepack
    layer = DenseLinear(torch.randn(320, 192).bfloat16(), torch.randn(320).bfloat16(), dispatch)
    for m in (9, 17, 21, 33, 47, 65, 100, 129, 300):
        x = torch.randn(m, 192).bfloat16()
        reference = (
            torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
            if layer.packed is not None
            else F.linear(x, layer.weight, layer.bias)
        )
        assert torch.equal(layer(x), reference), m


def _rss_mib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024


def test_every_row_count_adds_little_memory():
    """Unpadded, 300 new row counts on one weight grew the process by ~320 MiB on Zen 4 (oneDNN's JIT kernels)."""
    dispatch = LinearDispatch(torch.bfloat16, torch.device("cpu"))
    layer = DenseLinear(torch.randn(1536, 576).bfloat16(), None, dispatch)
    layer(torch.randn(512, 576).bfloat16())
    before = _rss_mib()
    for m in range(213, 513):
        layer(torch.randn(m, 576).bfloat16())
    assert _rss_mib() - before < 60
