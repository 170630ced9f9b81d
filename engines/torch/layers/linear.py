"""Dense (unquantized) linear layers, and which matmul they run by weight dtype, device and rows per step.

bf16 weights on a CPU with AMX (Intel Sapphire Rapids and later):
- steps of up to amx_linear.MAX_ROWS rows (all of a CPU engine's steps at its default budget) use
  kiln's AMX kernel on a copy of the weight packed into tile order at load: it streams weights at
  ~2x oneDNN's rate from 8 to 32 rows and is still ahead at 512 (bench/kernel_bf16_linear.py);
- weights whose sides are not multiples of 32, and larger steps, take the paths below.

bf16 weights on a CPU with avx512_bf16:
- decode-sized steps (at most SMALL_M_MAX rows) use kiln's weight-streaming kernel, which reads
  weights faster than F.linear (bench/kernel_bf16_linear.py);
- larger steps (big decode batches, prefill) are compute-bound and go to oneDNN with the weight
  reordered once at load into oneDNN's blocked layout (torch.ops.mkldnn, the same op inductor's
  CPU freezing pass emits). F.linear reorders the weight on every call, which is slower
  (bench/kernel_bf16_linear.py), with bit-identical results. The reordered copy costs one
  more weight's worth of memory; the [N, K] tensor stays for the small-M kernel.

oneDNN compiles (JIT) and caches a kernel per row count: served at every batch size and prompt length a server
meets, that cache grew the process by close to a MiB per new count and weight shape (hundreds of MiB over a
10-minute soak, bench/soak.py; docs/performance.md). Rows are padded up to one of 4 sizes per octave (at most 25%
more rows, 28 sizes up to
512), which bounds the cache; each output row is bit-identical to the unpadded call's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.kernels import amx_linear

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _onednn_prepack_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class LinearDispatch:
    """The dense matmuls of one engine's model dtype and device, chosen once when its model is assembled (every
    DenseLinear shares it); a layer then picks among them by its weight's shape and each step's row count."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.small_m_max = 0
        self.small: LinearFn = F.linear
        self.prepack = False
        self.amx = False
        self.pad_rows = False  # F.linear's bf16 CPU path is oneDNN too
        if dtype == torch.bfloat16 and device.type == "cpu":
            self.pad_rows = True
            from engines.torch.kernels import bf16_linear as kernel

            self.amx = amx_linear.available()

            if kernel.available():  # compiles once (~30 s), then loads from torch's extension cache
                self.small_m_max = kernel.SMALL_M_MAX
                self.small = kernel.bf16_linear
            self.prepack = _onednn_prepack_available()

    def describe(self) -> str:
        """For the load log: the matmul of each row range, smallest first."""
        paths = []
        if self.amx:
            paths.append(f"AMX up to {amx_linear.MAX_ROWS} rows (weights with sides of multiples of 32)")
        if self.small_m_max:
            paths.append(f"bf16_gemv up to {self.small_m_max} rows")
        paths.append("oneDNN prepacked" if self.prepack else "F.linear")
        return ", then ".join(paths)


class DenseLinear(nn.Module):
    """y = x W^T (+ b) for x [T, K] with W [N, K] in the model's dtype; the matmul is picked per call
    by the number of rows (LinearDispatch). The weight may be shared (tied LM head = embeddings)."""

    # oneDNN picks its blocking from a batch-size hint; any row count gives the same result.
    PREPACK_ROWS_HINT = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dispatch: LinearDispatch):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dispatch = dispatch
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # at most one packed copy: AMX's where the kernel runs here and takes the shape, else oneDNN's
        self.amx_packed = amx_linear.pack(weight) if dispatch.amx and amx_linear.fits(weight) else None
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), self.PREPACK_ROWS_HINT)
            if dispatch.prepack and self.amx_packed is None
            else None
        )

    @property
    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx_packed is not None and x.shape[0] <= amx_linear.MAX_ROWS:
            return amx_linear.amx_linear(x, self.amx_packed, self.bias)
        if x.shape[0] <= self.dispatch.small_m_max:
            return self.dispatch.small(x, self.weight, self.bias)
        if self.packed is not None:
            return _padded_rows(
                x, lambda padded: torch.ops.mkldnn._linear_pointwise(padded, self.packed, self.bias, "none", [], "")
            )
        if self.dispatch.pad_rows:
            return _padded_rows(x, lambda padded: F.linear(padded, self.weight, self.bias))
        return F.linear(x, self.weight, self.bias)


def onednn_rows(m: int) -> int:
    """`m` rounded up to one of 4 sizes per octave above 16 rows (16, 20, 24, 28, 32, 40, ...)."""
    if m <= 16:
        return m
    step = 1 << (m.bit_length() - 3)
    return -(-m // step) * step


def _padded_rows(x: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    m = x.shape[0]
    rows = onednn_rows(m)
    if rows == m:
        return matmul(x)
    return matmul(F.pad(x, (0, 0, 0, rows - m)))[:m]
