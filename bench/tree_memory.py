"""Resident memory of a server and every process it started (vLLM runs its engine in a child process), sampled
in a background thread while a benchmark runs."""

from __future__ import annotations

import threading
from pathlib import Path

MIB = 1 << 20


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_rss_mib(pid: int) -> float:
    """VmRSS summed over pid's process tree, in MiB (pages shared between them count once per process)."""
    total_kib = 0
    for member in descendants(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib * 1024 / MIB


class TreeRss:
    """`start()` samples the tree every `interval` s until `stop()`, which returns {"ready": first sample,
    "peak": highest} in MiB (and the same again when called twice)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> float:
        return tree_rss_mib(self.pid)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.now())
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.samples:
            return {}
        return {"ready": self.samples[0], "peak": max(self.samples)}
