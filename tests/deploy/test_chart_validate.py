"""The chart renders with every values file, and what it renders is valid: helm lint --strict, the core kinds
through kubernetes-validate --strict, the custom resources against their CRDs' schemas (tests/deploy/crds)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.deploy.chart import CHART, CORE_API_GROUPS, CRDS, VALUES_FILES, VALUES_IDS, helm, render, tool

pytestmark = pytest.mark.chart

# the chart's kubeVersion floor and kubernetes-validate's newest schemas
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# apiVersion/kind -> vendored CRD file
CRD_FILES = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}


@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_helm_lint_strict(values):
    result = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", VALUES_FILES, ids=VALUES_IDS)
def test_core_kinds_validate_strictly(values, version, tmp_path):
    docs = [doc for doc in render(values) if doc["apiVersion"] in CORE_API_GROUPS]
    assert any(doc["kind"] in ("Deployment", "StatefulSet") for doc in docs)
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    command = [tool("kubernetes-validate"), "--strict", "--no-warn", "-k", version, str(manifest)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(docs), result.stdout


def strict(schema: dict) -> dict:
    """The CRD schema as the API server applies it with strict field validation (kubectl's default): an
    object with declared properties accepts no others unless it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        declared = "properties" in schema and "additionalProperties" not in schema
        if declared and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def crd_schema(api_version: str, kind: str) -> dict:
    crd = yaml.safe_load((CRDS / CRD_FILES[api_version, kind]).read_text())
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = strict(served["schema"]["openAPIV3Schema"])
    # metadata is ObjectMeta, checked by the API server itself, not by the CRD
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def custom_objects() -> list[tuple[str, dict]]:
    objects = []
    for values, name in zip(VALUES_FILES, VALUES_IDS):
        objects += [
            (f"{name}:{doc['kind']}", doc) for doc in render(values) if doc["apiVersion"] not in CORE_API_GROUPS
        ]
    return objects


def test_every_custom_kind_has_a_vendored_crd():
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in custom_objects()}
    assert kinds == set(CRD_FILES), "a rendered custom resource without a CRD to check it against, or a CRD unused"


@pytest.mark.parametrize("label, doc", custom_objects(), ids=lambda value: value if isinstance(value, str) else "")
def test_custom_resources_match_their_crd_schema(label, doc, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(crd_schema(doc["apiVersion"], doc["kind"])))
    instance = tmp_path / "object.json"
    instance.write_text(json.dumps(doc))
    command = [tool("check-jsonschema"), "--schemafile", str(schema), str(instance)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{label}: {result.stdout}{result.stderr}"


def test_strict_schema_rejects_an_unknown_field(tmp_path):
    """The schema check can fail: an InferencePool with a misspelt field does not pass."""
    doc = next(doc for _, doc in custom_objects() if doc["kind"] == "InferencePool")
    doc = {**doc, "spec": {**doc["spec"], "targetPort": 8000}}
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(crd_schema(doc["apiVersion"], doc["kind"])))
    instance = tmp_path / "object.json"
    instance.write_text(json.dumps(doc))
    result = subprocess.run([tool("check-jsonschema"), "--schemafile", str(schema), str(instance)], capture_output=True)
    assert result.returncode == 1
