"""The grammar-mask kernel agrees with xgrammar's own CPU kernel bit for bit, on vocabularies that are and are
not multiples of 32, and leaves allowed logits untouched."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from engines.torch.kernels import token_mask
from tests.isa_helpers import isa_level_fixture

isa_level = isa_level_fixture(token_mask._EXT)  # every test below, once per ISA level this CPU has


@pytest.mark.parametrize("rows, vocab", [(1, 32), (3, 1000), (32, 49152), (5, 49155)])
def test_the_kernel_matches_xgrammar(rows, vocab):
    assert token_mask.available()
    torch.manual_seed(vocab)
    logits = torch.randn(rows, vocab)
    bitmask = xgr.allocate_token_bitmask(rows, vocab)
    bitmask.random_(-(2**31), 2**31 - 1)
    bitmask[0, :3] = -1  # whole words allowed
    bitmask[-1, -2:] = 0  # and none
    ours, theirs = logits.clone(), logits.clone()
    token_mask.apply_token_bitmask(ours, bitmask)
    xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab)
    assert torch.equal(ours, theirs)
    kept = ours != float("-inf")
    assert torch.equal(ours[kept], logits[kept])
