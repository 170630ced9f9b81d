"""Keep freed activation memory in the process instead of returning it to the OS (glibc malloc tuning).

glibc serves an allocation above its mmap threshold (128 KiB, raised on the fly up to the largest freed chunk)
with a fresh mmap, and gives the top of its heaps back once 2x that much is free. A step allocates and frees
the same activations again and again (a 2048-token prefill of SmolLM2-135M: [2048, 3072] gate_up outputs of
12.6 MB, ...), so every one of them came back as new zero pages: tens of thousands of page faults per
prefill step, against a few hundred after tuning (docs/performance.md). vLLM preloads tcmalloc for the same reason.

tune() raises the mmap threshold to its 32 MiB maximum and keeps up to 1 GiB of free heap; it leaves malloc
alone when another allocator is preloaded, when the user set these tunables (MALLOC_*_ variables or
GLIBC_TUNABLES), on a libc other than glibc, and when KILN_MALLOC_TUNING=0.

The price of keeping freed memory is resident memory at idle: after a burst of prefills the heap holds up to
the trim threshold of free pages. release_free() hands them back (malloc_trim); the engine calls it once it has
been idle for a while, so a busy server keeps its warm heap and an idle one shrinks (docs/performance.md,
"Resident memory").
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("kiln.engine")

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20
USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_done = False


def tune() -> bool:
    """Apply the tuning once per process; True when it is in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("KILN_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in USER_TUNABLES) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc", "mimalloc")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    if not ok:
        log.warning("glibc malloc tuning was refused; activations are re-faulted every step")
    _done = ok
    return ok


def release_free() -> bool:
    """Give the free pages of every glibc arena back to the OS; True when glibc released any. ctypes drops the
    GIL for the call, so HTTP handling goes on meanwhile."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return malloc_trim(0) == 1
