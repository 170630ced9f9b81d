"""Grammar token masks on float32 CPU logits in place (token_mask.cpp): the disallowed tokens' logits become
-inf, the allowed ones are not touched. Other devices and dtypes, or a failed build, use xgrammar's own kernel."""

from __future__ import annotations

from pathlib import Path

import torch
import xgrammar as xgr

from engines.torch.kernels.isa_variants import IsaVariants

_SOURCE = Path(__file__).with_name("token_mask.cpp")
_EXT = IsaVariants(
    "kiln_token_mask",
    _SOURCE,
    ["-O3", "-fopenmp"],
    ldflags=["-fopenmp"],
    fallback="xgrammar.apply_token_bitmask_inplace",
)


def available() -> bool:
    return _EXT.available()


def apply_token_bitmask(x: torch.Tensor, bitmask: torch.Tensor) -> None:
    """x: [R, V] logits; bitmask: [R, ceil(V / 32)] int32, bit t % 32 of word t // 32 set = token t allowed."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous():
        ext = _EXT.get()
        if ext is not None:
            ext.apply_token_bitmask(x, bitmask.contiguous())
            return
    xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device), vocab_size=x.shape[1])
