"""kiln replicas behind real routers on loopback (issue #21): bench/scaleout runs the three scenarios once, with
live `kiln serve` replicas, haproxy, vllm-router and Prometheus; these tests hold its measurements to the goals.
A missing tool fails the run with the command that installs it (`make test-scaleout` installs them all)."""

from __future__ import annotations

import pytest

from bench.scaleout.__main__ import SCENARIOS, run_all

pytestmark = pytest.mark.scaleout


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_all(list(SCENARIOS))["runs"]


def test_failover_loses_no_request_when_a_replica_is_sigtermed(runs):
    result = runs["failover"]
    assert result["failed"] == 0, result["failure_examples"]
    assert result["victim_exit_code"] == 0
    assert result["unattributed"] == 0  # every answer names its replica, so the counts below are complete
    victim, survivor = result["per_replica"]
    assert victim["before_sigterm"] > 0 and survivor["before_sigterm"] > 0, "haproxy did not use both replicas"
    assert survivor["after_sigterm"] > 0, "the load did not go on through the surviving replica"
    assert result["streamed"] > 0 and result["streamed"] < result["requests"]


def test_cache_aware_routing_gets_more_prefix_cache_hits_than_round_robin(runs):
    result = runs["prefix_routing"]
    policies = {run["policy"]: run for run in result["policies"]}
    for run in policies.values():
        assert run["failed"] == 0, run["failure_examples"]
        assert run["requests"] == result["prefixes"] * result["requests_per_prefix"]
        # both replicas served: a single replica would show the pool's eviction, not the routing
        assert all(counts["queries"] > 0 for counts in run["per_replica"].values()), run["per_replica"]
    # the honest setting: one replica's pool is smaller than all prefixes together, the pair's is not
    total_prefix_tokens = result["prefixes"] * policies["round_robin"]["mean_prompt_tokens"]
    assert result["kv_capacity_tokens_per_replica"] < total_prefix_tokens < 2 * result["kv_capacity_tokens_per_replica"]
    assert policies["cache_aware"]["hit_rate"] > policies["round_robin"]["hit_rate"], policies


def test_hpa_formula_on_scraped_queue_scales_up_under_the_burst_and_down_after(runs):
    result = runs["autoscale"]
    assert result["failed"] == 0
    current = result["hpa"]["current_replicas"]
    assert max(max(row["per_pod"]) for row in result["series"]) > result["hpa"]["target"], "no queue was scraped"
    assert result["max_desired_during_burst"] > current
    assert result["final_desired"] < current
