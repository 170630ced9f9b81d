"""The metric names the chart hands to other systems (the endpoint picker's engine mapping, the
prometheus-adapter rule, the KEDA query, the Grafana dashboard) are what a live `kiln serve` exports."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.chart import CHART, EXAMPLES, adapter_rule, core_metrics_extractor, only, render
from tests.server.conftest import CLEAN_EXIT, start_server

pytestmark = pytest.mark.chart

METRIC_NAME = re.compile(r"kiln:[a-z0-9_]+")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, list]:
    """{sample name: [samples]} of a live kiln's /metrics after one request, speculation on (so the
    spec_decode family exists) and the default model."""
    server = start_server(tmp_path_factory.mktemp("chart-metrics"), "--speculative-method", "ngram")
    try:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    finally:
        code = server.stop()
    assert code in CLEAN_EXIT, server.log()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((family.type, sample))
    return samples


def spec_name(spec: str) -> str:
    """The metric name of an EPP metric spec such as name{label=value}."""
    return spec.split("{", 1)[0]


def test_endpoint_picker_gauges_exist_on_kiln(exported):
    (engine,) = core_metrics_extractor(render(EXAMPLES / "inferencepool.yaml"))["engineConfigs"]
    for slot in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheInfoSpec"):
        name = spec_name(engine[slot])
        assert name in exported, f"{slot}: kiln exports no {name}"
        assert {kind for kind, _ in exported[name]} == {"gauge"}, f"{slot}: {name} is not a gauge"
    (_, usage), *_ = exported[spec_name(engine["kvUsageSpec"])]
    assert 0.0 <= usage.value <= 1.0, "the EPP reads KV-cache use as a fraction, as vLLM's"


def test_endpoint_picker_reads_block_size_and_block_count_labels_of_kiln_cache_info(exported):
    (engine,) = core_metrics_extractor(render(EXAMPLES / "inferencepool.yaml"))["engineConfigs"]
    ((_, info),) = exported[spec_name(engine["cacheInfoSpec"])]
    block_size = info.labels[engine["cacheBlockSizeLabelName"]]
    num_blocks = info.labels[engine["cacheNumBlocksLabelName"]]
    assert int(block_size) > 0 and int(num_blocks) > 0


def test_autoscalers_query_kiln_waiting_gauge(exported):
    keda = only(render(EXAMPLES / "keda.yaml"), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    names = set(METRIC_NAME.findall(keda)) | set(METRIC_NAME.findall(adapter_rule()["seriesQuery"]))
    assert names == {"kiln:num_requests_waiting"}
    assert {kind for kind, _ in exported["kiln:num_requests_waiting"]} == {"gauge"}


def test_dashboard_queries_only_metrics_kiln_exports(exported):
    dashboard = json.loads((CHART / "dashboards" / "kiln.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    missing = sorted(used - set(exported))
    assert not missing, f"the dashboard queries metrics kiln does not export: {missing}"
    for wanted in (
        "kiln:time_to_first_token_seconds_bucket",
        "kiln:inter_token_latency_seconds_bucket",
        "kiln:prefix_cache_hits_total",
        "kiln:spec_decode_num_accepted_tokens_total",
        "kiln:kv_cache_usage_perc",
        "kiln:num_requests_waiting",
    ):
        assert wanted in used, f"the dashboard has no panel on {wanted}"
    labels = {label for samples in exported.values() for _, sample in samples for label in sample.labels}
    assert {"model_name", "finished_reason"} <= labels
