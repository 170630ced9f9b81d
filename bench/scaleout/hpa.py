"""The Kubernetes HorizontalPodAutoscaler's replica calculation for a Pods metric (an average value per pod),
replayed over a scraped series.

desired = ceil(current * average / target), unchanged while |average / target - 1| <= tolerance, clamped to
[min, max]. Scaling down follows the highest recommendation of the last `scale_down_window_s` (the HPA's
stabilisation window, 300 s by default); scaling up is immediate (its default window is 0). The HPA's rate
policies (at most +100 % or +4 pods per 15 s) and its 15 s sync period are left out: every scraped second is
an evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HpaSpec:
    target: float  # target average value per pod
    min_replicas: int
    max_replicas: int
    tolerance: float = 0.1
    scale_down_window_s: float = 300.0


def desired_replicas(spec: HpaSpec, current: int, per_pod: list[float]) -> int:
    average = sum(per_pod) / len(per_pod)
    ratio = average / spec.target
    if abs(ratio - 1.0) <= spec.tolerance:
        return current
    return min(spec.max_replicas, max(spec.min_replicas, math.ceil(current * ratio)))


def replay(spec: HpaSpec, current: int, series: list[tuple[float, list[float]]]) -> list[dict]:
    """For each (time, per-pod values): the raw recommendation and the one after scale-down stabilisation.
    `current` stays fixed: this recommends, it does not start pods."""
    rows: list[dict] = []
    for time_s, per_pod in series:
        raw = desired_replicas(spec, current, per_pod)
        window = [row["raw"] for row in rows if time_s - row["time_s"] < spec.scale_down_window_s] + [raw]
        # a scale-up applies at once; a scale-down only to the highest recommendation still inside the window,
        # and not at all while that is above the current count
        stabilised = raw if raw > current else min(current, max(window))
        rows.append(
            {
                "time_s": time_s,
                "per_pod": per_pod,
                "average": sum(per_pod) / len(per_pod),
                "raw": raw,
                "desired": stabilised,
            }
        )
    return rows
