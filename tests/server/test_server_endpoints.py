"""Models, health, metadata, version and metrics on the live server."""

from __future__ import annotations

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import scrape

pytestmark = pytest.mark.slow


def test_models(openai_client, model_name, http):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [model_name]
    model = openai_client.models.retrieve(model_name)
    assert model.id == model_name and model.object == "model" and model.owned_by == "kiln"
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("gpt-4")


def test_health(http):
    assert http.get("/v1/health/live").json()["status"] == "live"
    for path in ("/v1/health/ready", "/health"):
        response = http.get(path)
        assert response.status_code == 200 and response.json()["status"] == "ready"


def test_metadata_and_version(http, model_name):
    metadata = http.get("/v1/metadata").json()
    assert metadata["model"] == model_name
    assert metadata["backend"] == "torch"
    for key in (
        "precision",
        "kv_cache_dtype",
        "hardware",
        "profile",
        "max_model_len",
        "block_size",
        "num_kv_blocks",
        "versions",
        "extra",
    ):
        assert key in metadata
    assert {"kiln", "python", "torch", "transformers"} <= set(metadata["versions"])
    version = http.get("/v1/version").json()["version"]
    assert version == metadata["versions"]["kiln"]


def test_metadata_and_log_name_the_implementation_of_each_cpu_kernel(http, live_server):
    """The engine says once at start, and /v1/metadata keeps saying, which variant each CPU kernel op runs here."""
    from engines import cpu_isa
    from engines.torch.kernels import dispatch

    extra = http.get("/v1/metadata").json()["extra"]
    assert extra["cpu_kernels"] == dispatch.report(compiled=True)
    (line,) = [line for line in live_server.log().splitlines() if "CPU kernels at ISA level" in line]
    assert f"CPU kernels at ISA level {cpu_isa.describe()}: " in line
    assert all(f"{op} {implementation}" in line for op, implementation in extra["cpu_kernels"].items())


METRIC_NAMES = [
    "kiln:num_requests_running",
    "kiln:num_requests_waiting",
    "kiln:kv_cache_usage_perc",
    "kiln:prefix_cache_queries_total",
    "kiln:prefix_cache_hits_total",
    "kiln:num_preemptions_total",
    "kiln:prompt_tokens_total",
    "kiln:generation_tokens_total",
]
HISTOGRAMS = [
    "kiln:time_to_first_token_seconds",
    "kiln:inter_token_latency_seconds",
    "kiln:e2e_request_latency_seconds",
    "kiln:request_queue_time_seconds",
]


def test_metrics_move_with_requests(http, openai_client, model_name):
    response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    before = scrape(http)
    for name in METRIC_NAMES:
        assert name in before, name
    prompt = "Repeat after me: the quick brown fox jumps over the lazy dog."
    for _ in range(2):  # the second one finds the prompt in the prefix cache
        result = openai_client.completions.create(
            model=model_name, prompt=prompt * 3, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
    after = scrape(http)
    assert after["kiln:prompt_tokens_total"] - before["kiln:prompt_tokens_total"] >= 2 * result.usage.prompt_tokens
    assert after["kiln:generation_tokens_total"] - before["kiln:generation_tokens_total"] >= 8
    assert after["kiln:prefix_cache_hits_total"] > before["kiln:prefix_cache_hits_total"]
    assert result.usage.prompt_tokens_details.cached_tokens > 0
    length = 'kiln:request_success_total{finished_reason="length"}'
    assert after[length] - before.get(length, 0) == 2
    for name in HISTOGRAMS:
        assert after[f"{name}_count"] - before.get(f"{name}_count", 0) >= 2, name
        assert f'{name}_bucket{{le="+Inf"}}' in after


def test_cache_config_info_carries_the_pool_under_vllm_label_names(http):
    """The endpoint picker of the Gateway API Inference Extension reads block_size and num_gpu_blocks from the
    cache-config info metric's labels; they must describe the pool /v1/metadata reports."""
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    (sample,) = families["kiln:cache_config_info"].samples
    metadata = http.get("/v1/metadata").json()
    assert sample.value == 1
    assert int(sample.labels["block_size"]) == metadata["block_size"]
    assert int(sample.labels["num_gpu_blocks"]) == int(sample.labels["num_blocks"]) == metadata["num_kv_blocks"] > 0
