"""Prometheus metrics with vLLM's names under the `kiln:` prefix, one registry per app.

Gauges and counters the engine already keeps (EngineStats) are read at scrape time by a custom
collector; latency histograms are observed by the server as requests progress.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engines.base import RequestTimings

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)


class EngineStatsCollector(Collector):
    """Mirrors EngineStats at scrape time (nothing while the engine loads)."""

    def __init__(self, holder):
        self.holder = holder

    def collect(self):
        engine = self.holder.engine
        if engine is None:
            return
        stats = engine.stats()
        labels = [self.holder.served_model_name]

        def gauge(name, doc, value):
            family = GaugeMetricFamily(f"kiln:{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(f"kiln:{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("num_requests_running", "Requests in the engine's running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", stats.kv_cache_usage)
        info = engine.info
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV-cache pool holds.", info.kv_capacity_tokens)
        # vLLM's cache_config_info: a constant 1 whose labels carry the configuration. num_gpu_blocks repeats
        # num_blocks under vLLM's label name (on a CPU too): the Gateway API Inference Extension's endpoint
        # picker reads the pool size from that label.
        config = GaugeMetricFamily(
            "kiln:cache_config_info",
            "KV-cache configuration (labels; value is 1).",
            labels=["model_name", "cache_dtype", "block_size", "num_blocks", "num_gpu_blocks"],
        )
        blocks = str(info.num_kv_blocks)
        config.add_metric(labels + [info.kv_cache_dtype, str(info.block_size), blocks, blocks], 1)
        yield config
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield counter(
            "num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.", stats.num_preemptions
        )
        yield counter("prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", stats.generation_tokens)
        if info.details.speculative is not None:  # vLLM's spec_decode_* family, when speculation is on
            yield counter(
                "spec_decode_num_drafts", "Verification steps that checked draft tokens.", stats.spec_num_drafts
            )
            yield counter(
                "spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", stats.spec_draft_tokens
            )
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", stats.spec_accepted_tokens)
            yield gauge(
                "spec_decode_acceptance_rate",
                "Accepted / proposed draft tokens since start.",
                stats.spec_acceptance_rate,
            )
            yield gauge(
                "spec_decode_mean_accepted_length",
                "Draft tokens accepted per verification step since start (tokens per step = this + 1).",
                stats.spec_mean_accepted_length,
            )


class ServerMetrics:
    def __init__(self, holder):
        self.holder = holder
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.time_to_first_token = Histogram(
            "kiln:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "kiln:inter_token_latency_seconds",
            "Time between successive engine outputs of a request.",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "kiln:e2e_request_latency_seconds",
            "Time from arrival to the last token of a request.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.request_queue_time = Histogram(
            "kiln:request_queue_time_seconds",
            "Time a request waited before its first scheduling.",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.request_success = Counter(
            "kiln:request_success",
            "Finished choices by finish reason.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.registry.register(EngineStatsCollector(holder))

    def observe_first_output(self, model: str, timings: RequestTimings, now: float) -> None:
        if timings.first_scheduled is not None:
            self.request_queue_time.labels(model).observe(max(0.0, timings.first_scheduled - timings.arrival))
        first_token = timings.first_token if timings.first_token is not None else now
        self.time_to_first_token.labels(model).observe(max(0.0, first_token - timings.arrival))

    def observe_inter_token(self, model: str, seconds: float) -> None:
        self.inter_token_latency.labels(model).observe(seconds)

    def observe_finished(self, model: str, timings: RequestTimings, now: float, finish_reasons: list[str]) -> None:
        finished = timings.finished if timings.finished is not None else now
        self.e2e_request_latency.labels(model).observe(max(0.0, finished - timings.arrival))
        for reason in finish_reasons:
            self.request_success.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
