"""glibc malloc tuning (engines/torch/host_malloc.py): after tune(), activations freed and allocated again
come back without new page faults; the user's own settings and KILN_MALLOC_TUNING=0 leave malloc alone.
Each case runs in a fresh interpreter, since the tuning is process-wide and cannot be undone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# Four 12 MiB activations live at once, then freed, as in a prefill step: more than glibc's dynamic trim
# threshold (2 x the largest freed chunk) falls free, so untuned malloc hands the heap top back each time.
PROBE = """
import ctypes, resource
from engines.torch import host_malloc
tuned = host_malloc.tune()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 12 << 20
def step():  # C calls only, so no Python object lands on top of the heap between them
    blocks = [libc.malloc(SIZE) for _ in range(4)]
    for b in blocks:
        ctypes.memset(b, 1, SIZE)
    for b in blocks:
        libc.free(b)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "KILN_MALLOC", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


def test_tuned_malloc_reuses_freed_activations():
    tuned, faults = _probe()
    untuned, untuned_faults = _probe(KILN_MALLOC_TUNING="0")
    assert tuned and not untuned
    pages = 5 * 4 * (12 << 20) // 4096  # what re-faulting every step would cost
    assert untuned_faults > pages // 2, untuned_faults  # the probe does reproduce the problem
    assert faults < pages // 50, faults


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "100000"},
        {"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"},
        {"LD_PRELOAD": "libjemalloc.so.2"},
    ],
)  # (ld.so skips a missing one, with a note)
def test_user_settings_win(env):
    tuned, _ = _probe(**env)
    assert not tuned


# After a step's activations are freed, the tuned heap keeps them (no new faults next step); release_free(), which
# the engine calls once idle, hands them back to the OS.
RELEASE_PROBE = """
import ctypes, re
from engines.torch import host_malloc
assert host_malloc.tune()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_kib():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
SIZE = 12 << 20
blocks = [libc.malloc(SIZE) for _ in range(4)]
for b in blocks:
    ctypes.memset(b, 1, SIZE)
for b in blocks:
    libc.free(b)
kept = rss_kib()
released = host_malloc.release_free()
print(released, kept - rss_kib())
"""


def test_release_free_returns_the_kept_heap():
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "KILN_MALLOC", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_PROBE],
        env=clean,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    released, dropped_kib = out.stdout.split()
    assert released == "True"
    assert int(dropped_kib) > 3 * (12 << 10), dropped_kib  # at least 3 of the 4 freed 12 MiB activations
