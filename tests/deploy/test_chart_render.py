"""What the chart renders: probes, the drain on delete, the grace period, the security context, the engine
build, autoscaling names and the endpoint picker's labels; and that settings which cannot work fail to
render with a message that says why."""

from __future__ import annotations

import re

import pytest

from server.settings import ServerSettings
from tests.deploy.chart import (
    EXAMPLES,
    VALUES_FILES,
    VALUES_IDS,
    adapter_rule,
    core_metrics_extractor,
    helm,
    kiln_container,
    kiln_settings,
    only,
    render,
    template_args,
    workload,
)

pytestmark = pytest.mark.chart

KILN_SHUTDOWN_DEFAULT = ServerSettings.model_fields["graceful_shutdown_timeout"].default


def render_error(*sets: str, values=None) -> str:
    result = helm(*template_args(values, *sets))
    assert result.returncode != 0, "rendering was expected to fail"
    return result.stderr


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_probes_use_kiln_health_endpoints(values):
    container = kiln_container(render(values))
    assert container["livenessProbe"]["httpGet"]["path"] == "/v1/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v1/health/ready"
    # a first start (engine load, kernels compiled for this CPU) gets at least 10 minutes
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "http"


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_prestop_sleep_then_a_grace_period_longer_than_kiln_drain(values):
    docs = render(values)
    container = kiln_container(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop > 0
    settings = kiln_settings(docs)
    kiln_drain = float(settings.get("KILN_GRACEFUL_SHUTDOWN_TIMEOUT", KILN_SHUTDOWN_DEFAULT))
    grace = workload(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + kiln_drain


def test_grace_period_follows_kiln_shutdown_timeout():
    docs = render(None, "settings.KILN_GRACEFUL_SHUTDOWN_TIMEOUT=120", "preStopSeconds=15")
    assert workload(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 15 + 120 + 10


def test_grace_period_below_kiln_drain_fails_with_a_readable_message():
    error = render_error("terminationGracePeriodSeconds=30")
    assert "terminationGracePeriodSeconds=30 is too short" in error
    assert "preStopSeconds=10" in error and "KILN_GRACEFUL_SHUTDOWN_TIMEOUT=30" in error
    assert "must be above 40" in error


def test_grace_period_above_kiln_drain_is_kept():
    docs = render(None, "terminationGracePeriodSeconds=41")
    assert workload(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 41


def test_non_numeric_shutdown_timeout_fails():
    assert "must be a number of seconds" in render_error("settings.KILN_GRACEFUL_SHUTDOWN_TIMEOUT=soon")


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_runs_as_the_image_user_without_privileges(values):
    pod = workload(render(values))["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["fsGroup"] == 10001
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]


def test_cpu_default_has_a_read_only_root_and_writable_volumes_for_what_kiln_writes():
    docs = render()
    pod = workload(docs)["spec"]["template"]["spec"]
    container = kiln_container(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for variable in ("KILN_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "HF_HOME", "HOME"):
        folder = env[variable]
        mount = max((path for path in mounts if folder == path or folder.startswith(path + "/")), key=len)
        assert mounts[mount] in emptydirs, f"{variable}={folder} is not on a writable volume"
    assert mounts["/tmp"] in emptydirs


def test_gpu_example_requests_a_gpu_and_memory_backed_shm():
    docs = render(EXAMPLES / "gpu-trtllm.yaml")
    container = kiln_container(docs)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = workload(docs)["spec"]["template"]["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    build = next(c for c in pod["initContainers"] if c["name"] == "build-engine")
    assert build["args"][:3] == ["build", "--output", "/engines/default"]
    assert "--backend" in build["args"] and "trtllm" in build["args"]


def test_init_container_builds_the_engine_the_server_serves():
    docs = render()
    pod = workload(docs)["spec"]["template"]["spec"]
    build = next(c for c in pod["initContainers"] if c["name"] == "build-engine")
    assert build["args"][:3] == ["build", "--output", "/engines/default"]
    assert kiln_container(docs)["args"] == ["serve", "--engine-dir", "/engines/default"]


def test_serving_without_an_engine_passes_the_model_to_serve_only():
    docs = render(
        None, "engine.build=false", "model.source=/models/llama", "model.storage=hostPath", "model.hostPath=/srv/models"
    )
    assert kiln_container(docs)["args"] == ["serve"]
    assert kiln_settings(docs)["KILN_MODEL"] == "/models/llama"
    names = [c["name"] for c in workload(docs)["spec"]["template"]["spec"]["initContainers"]]
    assert "build-engine" not in names


def test_job_mode_builds_once_before_the_pods_and_mounts_the_engine_read_only():
    docs = render(EXAMPLES / "hpa.yaml")
    job = only(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    claim = only(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/hook"] == "pre-install"
    assert int(claim["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = workload(docs)["spec"]["template"]["spec"]
    assert "build-engine" not in [c["name"] for c in pod.get("initContainers", [])]
    (engines,) = [m for m in kiln_container(docs)["volumeMounts"] if m["name"] == "engines"]
    assert engines["readOnly"] is True


def test_statefulset_gives_each_replica_its_own_engine_claim():
    docs = render(EXAMPLES / "statefulset.yaml")
    statefulset = only(docs, "StatefulSet")
    assert [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]] == ["engines"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


@pytest.mark.parametrize(
    "sets, message",
    [
        (("replicaCount=2", "engine.storage.kind=pvc"), "would run `kiln build` into the same folder at once"),
        (("engine.buildMode=job",), "engine.buildMode=job builds once into a volume every pod mounts"),
        (("autoscaling.hpa.enabled=true", "autoscaling.keda.enabled=true"), "not both"),
        (("workload.kind=DaemonSet",), "workload.kind must be Deployment or StatefulSet"),
        (("settings.KILN_PORT=9000",), "settings.KILN_PORT is set by the chart"),
    ],
)
def test_settings_that_cannot_work_fail_to_render(sets, message):
    assert message in render_error(*sets)


def test_hpa_scales_on_the_metric_the_adapter_rule_serves():
    hpa = only(render(EXAMPLES / "hpa.yaml"), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"] == "kiln_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert "replicas" not in workload(render(EXAMPLES / "hpa.yaml"))["spec"], "the HPA owns the replica count"


def test_adapter_rule_reads_kiln_waiting_gauge_per_pod():
    rule = adapter_rule()
    assert re.fullmatch(rule["name"]["matches"], "kiln:num_requests_waiting")
    assert rule["seriesQuery"].startswith("kiln:num_requests_waiting{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_keda_queries_kiln_waiting_requests_of_this_release():
    docs = render(EXAMPLES / "keda.yaml")
    scaled = only(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == 'sum(kiln:num_requests_waiting{namespace="llm",service="kiln"})'
    assert trigger["metadata"]["threshold"] == "5"
    assert only(docs, "Service")["metadata"]["name"] == "kiln"
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "kiln"}


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_pods_carry_the_engine_type_labels_the_endpoint_picker_reads(values):
    labels = workload(render(values))["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == "kiln"
    assert labels["inference.networking.k8s.io/engine-type"] == "kiln"


def test_inference_pool_selects_kiln_pods_and_names_the_endpoint_picker():
    docs = render(EXAMPLES / "inferencepool.yaml")
    pool = only(docs, "InferencePool")
    pod_labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    epp_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kiln-epp")
    assert pool["spec"]["endpointPickerRef"]["name"] == epp_service["metadata"]["name"]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kiln-epp")
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--config-file") + 1] == "/config/epp-config.yaml"


def test_endpoint_picker_maps_pods_labelled_kiln_to_kiln_metrics():
    extractor = core_metrics_extractor(render(EXAMPLES / "inferencepool.yaml"))
    assert extractor["engineLabelKey"] == "llm-d.ai/engine-type"
    (engine,) = extractor["engineConfigs"]
    assert engine["name"] == extractor["defaultEngine"] == "kiln"
    for slot in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheInfoSpec"):
        assert engine[slot].startswith("kiln:")


def test_kiln_selectors_do_not_pick_the_endpoint_picker():
    docs = render(EXAMPLES / "inferencepool.yaml")
    selectors = [
        only(docs, "InferencePool")["spec"]["selector"]["matchLabels"],
        only(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"],
        next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kiln")["spec"]["selector"],
    ]
    epp = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kiln-epp")
    epp_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kiln-epp")
    for selector in selectors:
        for labels in (epp["spec"]["template"]["metadata"]["labels"], epp_service["metadata"]["labels"]):
            assert not selector.items() <= labels.items()


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_no_volume_hides_the_image_cache_the_seed_links_to(values):
    """The seed links the image's converted models from image.cacheSeedDir: a volume mounted over that
    folder (or above it) would leave the links dangling and the model reconverted at each start."""
    pod = workload(render(values))["spec"]["template"]["spec"]
    seed = next(c for c in pod["initContainers"] if c["name"] == "seed-cache")
    (source,) = re.findall(r"^src=(\S+)$", seed["args"][0], re.M)
    for container in pod["containers"] + pod["initContainers"]:
        for mount in container["volumeMounts"]:
            path = mount["mountPath"].rstrip("/")
            assert not (source == path or source.startswith(path + "/")), f"{container['name']}: {path} hides {source}"
