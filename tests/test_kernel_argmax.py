"""The C++ row argmax against torch.argmax: same index on ties (first occurrence), NaN rows (first NaN),
all -inf rows, vocabularies that are not a multiple of the 16-lane vector, and the torch fallback."""

from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import argmax
from tests.isa_helpers import isa_level_fixture

pytestmark = pytest.mark.skipif(not argmax.available(), reason="argmax kernel unavailable")

isa_level = isa_level_fixture(argmax._EXT)  # every test below, once per ISA level this CPU has


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 49152, 49157])
def test_matches_torch(vocab):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(33, vocab, generator=gen)
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))


def test_ties_nan_and_inf():
    x = torch.zeros(6, 100)
    x[0, [7, 40, 99]] = 3.0  # tie: the first wins
    x[1, 98:] = 5.0  # tie inside the scalar tail
    x[2, [10, 50]] = float("nan")  # first NaN wins, as torch
    x[2, 5] = 9.0
    x[3, 99] = float("nan")  # NaN in the tail
    x[4] = float("-inf")
    x[5, 17] = float("inf")
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))
    assert argmax.argmax_rows(x).tolist() == [7, 98, 10, 99, 0, 17]


def test_non_contiguous_and_fallback_dtypes():
    x = torch.randn(8, 300)[:, ::3]
    assert torch.equal(argmax.argmax_rows(x), x.argmax(dim=-1))
    b = torch.randn(4, 50).bfloat16()  # not float32: torch.argmax
    assert torch.equal(argmax.argmax_rows(b), b.argmax(dim=-1))
