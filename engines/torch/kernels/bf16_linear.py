"""bf16 linear for decode-sized batches (M = 1..SMALL_M_MAX rows): bf16 in, bf16 out, fp32 accumulation.

At small M a linear layer is bound by reading its weight from memory, and F.linear's bf16 path
streams weights at well under half the machine's read bandwidth. The C++ kernel beside this file
(bf16_gemv.cpp) reads each weight once per call with AVX-512 BF16 dot products (vdpbf16ps),
applying all M rows of x to each weight line it loads. Weights keep their usual [N, K] layout:
no pre-packing, so the same tensor still serves F.linear for prefill.

The extension is compiled on first use by torch.utils.cpp_extension.load (needs g++ and ninja on
PATH -- `pip install ninja` if there is no system ninja; ~30-40 s once), then cached in torch's
extension directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and loaded in about
a second by later processes. `available()` is False when the CPU lacks avx512_bf16 or the build
fails (one warning, never raises); `bf16_linear` then falls back to F.linear, so callers may call
it unconditionally. Results are deterministic and batch-invariant (row i of the output does not
depend on the other rows of x nor on the thread count).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch.kernels.extension import LazyExtension

# Largest number of rows of x for which bf16_linear beats F.linear on cold (streamed) weights
# (bench/kernel_bf16_linear.py); callers use F.linear above it.
SMALL_M_MAX = 8

_SOURCE = Path(__file__).with_name("bf16_gemv.cpp")
# Explicit ISA flags rather than -march=native: the cached binary stays valid on any CPU with
# avx512_bf16 (Zen4, Sapphire Rapids, ...), and available() checks for it before loading.
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
_EXT = LazyExtension(
    "kiln_bf16_gemv", _SOURCE, _CFLAGS, required_cpu_flags=("avx512_bf16",), ldflags=["-fopenmp"], fallback="F.linear"
)


def available() -> bool:
    """True when the compiled kernel can be used (compiles or loads it on the first call)."""
    return _EXT.available()


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 x [..., K], weight [N, K] (contiguous, else copied per call)
    and bias [N]: bf16 result of an fp32 accumulation, rounded once. Fast for at most SMALL_M_MAX
    rows of x; correct for any. Releases the GIL while it computes."""
    ext = _EXT.get()
    if ext is None:
        return F.linear(x, weight, bias)
    return ext.bf16_linear(x, weight, bias)
