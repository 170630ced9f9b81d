"""Shared check that a C++ kernel releases the GIL while it runs (kiln calls kernels from its step-loop thread)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


def assert_releases_gil(call: Callable[[], object], calls: int = 3, min_ticks: int = 5) -> None:
    """A Python thread ticks (sleeping briefly between ticks, so it hands the GIL back freely) while this
    thread makes `calls` calls of `call` (each should take several ms). With the switch interval set to
    2 s, a thread waiting for the GIL is only forced in after 2 s, and Python code between the calls does
    not block: the ticker can run inside the calls only if they released the GIL."""
    call()  # warm-up: first-call allocations and page faults outside the windows
    ticks, stop, ready = [], threading.Event(), threading.Event()

    def tick():
        ready.set()
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0002)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    try:
        ticker = threading.Thread(target=tick)
        ticker.start()
        ready.wait()
        windows = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            windows.append((t0, time.perf_counter()))
    finally:
        stop.set()
        ticker.join()
        sys.setswitchinterval(interval)
    inside = sum(any(t0 < t < t1 for t0, t1 in windows) for t in ticks)
    assert inside >= min_ticks, f"another Python thread ran {inside} times during the kernel calls"
