"""Which rows of a step's flat batch are decode rows, for layers whose decode kernel and prefill GEMM sum in
different orders (layers/affine_int4.py).

A step's flat batch puts its decode rows first (AttentionMetadata.num_decode_tokens: decodes, verifications, a
draft's catch-up) and its prompt chunks after them. Such a layer must compute each token the same way whatever else
shares its step: a prompt's tokens with the prefill GEMM (whose rows do not depend on one another) whether the
prompt ran whole, in chunks or after a prefix-cache hit, and a generated token with the decode kernel (batch-
invariant) whatever the batch. Choosing by the step's row count instead made a repeated prompt answer differently
once its prefix was cached: the tail's few rows went through the kernel, the whole prompt's through the GEMM. The
model's forward says, while it runs, how many rows the step has and how many of them are decode rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_state = threading.local()  # each engine thread runs its own steps


@contextmanager
def step(rows: int, decode_rows: int) -> Iterator[None]:
    """While a forward over a flat batch of `rows` rows, the first `decode_rows` of them decode rows, runs."""
    outer = getattr(_state, "step", None)
    _state.step = (rows, decode_rows)
    try:
        yield
    finally:
        _state.step = outer


def decode_rows(rows: int) -> int | None:
    """How many of the first rows of an input of `rows` rows are decode rows, when that input is the running step's
    flat batch; None when no step runs or the input is some other set of rows (an expert's, the LM head's)."""
    current = getattr(_state, "step", None)
    if current is None or current[0] != rows:
        return None
    return current[1]


def route(
    x: torch.Tensor,
    in_features: int,
    kernel_rows: int,
    kernel: Callable[[torch.Tensor], torch.Tensor],
    gemm: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """x [..., in_features] through `kernel` (decode rows, when at most kernel_rows of them) and `gemm` (prompt rows,
    and decode rows past kernel_rows), each a function of [M, in_features] rows to [M, out] rows. Outside a step's
    flat batch, all of x through kernel when it has at most kernel_rows rows, else through gemm."""
    rows = x.numel() // in_features
    decode = decode_rows(rows)
    if decode is None:
        decode = rows if rows <= kernel_rows else 0
    if decode == 0 or decode > kernel_rows:
        return gemm(x)
    if decode == rows:
        return kernel(x)
    x2 = x.reshape(rows, in_features)
    y = torch.cat([kernel(x2[:decode]), gemm(x2[decode:])])
    return y.reshape(*x.shape[:-1], y.shape[-1])
