"""engines/torch/kernels/bf16_linear: agreement with an fp32 reference within bf16 rounding, for the
SmolLM2 decode shapes and K tails, M = 1..SMALL_M_MAX (and beyond, where it must still be right);
determinism, batch and thread invariance, GIL release, and the F.linear fallback.

Skipped when the kernel is unavailable (no avx512_bf16, no compiler or ninja). The first run
compiles the extension (~40 s), later runs load it from torch's extension cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.torch.kernels import bf16_linear as kmod
from engines.torch.kernels import extension
from engines.torch.kernels.bf16_linear import SMALL_M_MAX, available, bf16_linear
from tests.gil_helpers import assert_releases_gil
from tests.linear_helpers import bf16_inputs, check_bf16_linear

SMOLLM2_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down (N, K)
TAIL_SHAPES = [(100, 100), (33, 77), (17, 1), (48, 31), (40, 33), (1000, 63), (5, 200)]  # K % 32 != 0, N % 16 != 0


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not available():
        pytest.skip("bf16_linear kernel unavailable (no avx512_bf16, compiler or ninja)")


@pytest.mark.parametrize("n,k", SMOLLM2_SHAPES + TAIL_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_fp32_reference(n, k, bias):
    for m in list(range(1, SMALL_M_MAX + 1)) + [SMALL_M_MAX + 1, 16, 21]:  # beyond SMALL_M_MAX: slower, still right
        x, w, b = bf16_inputs(m, n, k, seed=m * 1000 + n + k, bias=bias)
        check_bf16_linear(bf16_linear(x, w, b), x, w, b)


def test_lm_head_shape():
    for m in (1, 3, SMALL_M_MAX):
        x, w, _ = bf16_inputs(m, 49152, 576, seed=m, bias=False)
        check_bf16_linear(bf16_linear(x, w), x, w, None)


def test_leading_dims_noncontiguous_x_and_degenerate_shapes():
    x, w, b = bf16_inputs(6, 96, 64, seed=1, bias=True)
    y = bf16_linear(x.view(2, 3, 64), w, b)
    assert y.shape == (2, 3, 96) and torch.equal(y.view(6, 96), bf16_linear(x, w, b))
    wide = torch.randn(4, 128).bfloat16()
    check_bf16_linear(bf16_linear(wide[:, ::2], w, b), wide[:, ::2], w, b)  # strided x is copied, still right
    assert bf16_linear(torch.empty(0, 64, dtype=torch.bfloat16), w).shape == (0, 96)
    empty_k = bf16_linear(torch.empty(3, 0, dtype=torch.bfloat16), torch.empty(5, 0, dtype=torch.bfloat16))
    assert empty_k.shape == (3, 5) and not empty_k.any()


def test_deterministic_batch_and_thread_invariant():
    x, w, b = bf16_inputs(SMALL_M_MAX, 3072, 576, seed=7, bias=True)
    y = bf16_linear(x, w, b)
    for _ in range(3):
        assert torch.equal(bf16_linear(x, w, b), y)
    for i in range(x.shape[0]):  # each output row is one fixed-order sum: independent of the batch
        assert torch.equal(bf16_linear(x[i : i + 1], w, b), y[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(bf16_linear(x, w, b), y)
    finally:
        torch.set_num_threads(threads)


def test_releases_the_gil():
    x, w, _ = bf16_inputs(SMALL_M_MAX, 49152, 1536, seed=3, bias=False)  # ~150 MB of weight: long calls
    assert_releases_gil(lambda: bf16_linear(x, w))


def test_fallback_and_no_raise_when_unavailable(monkeypatch, caplog):
    x, w, b = bf16_inputs(2, 64, 96, seed=5, bias=True)
    monkeypatch.setattr(kmod._EXT, "module", None)
    monkeypatch.setattr(kmod._EXT, "tried", False)
    monkeypatch.setattr(extension, "cpu_flags", lambda: {"avx512f"})
    with caplog.at_level("WARNING", logger="kiln.kernels"):
        assert kmod.available() is False
    assert len(caplog.records) == 1 and "avx512_bf16" in caplog.records[0].getMessage()
    assert torch.equal(bf16_linear(x, w, b), F.linear(x, w, b))

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(kmod._EXT, "tried", False)
    monkeypatch.setattr(extension, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_load)
    assert kmod.available() is False
    assert torch.equal(bf16_linear(x, w, b), F.linear(x, w, b))
