"""bench/scaleout/hpa.py against the Kubernetes HPA's documented arithmetic (the scale-out check replays it over
Prometheus series, so a wrong formula would pass or fail that check for the wrong reason)."""

from __future__ import annotations

from bench.scaleout.hpa import HpaSpec, desired_replicas, replay

SPEC = HpaSpec(target=5, min_replicas=1, max_replicas=6, tolerance=0.1, scale_down_window_s=10)


def test_desired_is_the_ceiling_of_current_times_average_over_target():
    assert desired_replicas(SPEC, 2, [8, 6]) == 3  # ceil(2 * 7 / 5)
    assert desired_replicas(SPEC, 3, [1, 2, 3]) == 2  # ceil(3 * 2 / 5)


def test_within_the_tolerance_the_count_stays():
    assert desired_replicas(SPEC, 2, [5.4, 5.4]) == 2  # ratio 1.08
    assert desired_replicas(SPEC, 2, [5.6, 5.6]) == 3  # ratio 1.12: ceil(2.24)


def test_desired_is_clamped_to_min_and_max():
    assert desired_replicas(SPEC, 2, [0, 0]) == 1
    assert desired_replicas(SPEC, 4, [40, 40, 40, 40]) == 6


def test_scale_up_is_immediate_and_scale_down_waits_for_the_window():
    series = [(0.0, [0, 0]), (1.0, [10, 10]), (2.0, [0, 0]), (10.5, [0, 0]), (11.0, [0, 0])]
    desired = [row["desired"] for row in replay(SPEC, 2, series)]
    # t=0: raw 1 and nothing higher in the window yet, so down to 1; t=1: up to 4 at once; t=2 and t=10.5: the 4
    # of t=1 is still inside the 10 s window, which holds the count at the current 2; t=11: it left (Kubernetes keeps
    # recommendations strictly newer than now - window), down to 1
    assert desired == [1, 4, 2, 2, 1]
