"""The Helm chart under test (deploy/helm/kiln) and the tools that check it, found where
`python -m scripts.install_deploy_tools` and the `deploy` extra put them: a missing tool fails the test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kiln"
EXAMPLES = CHART / "examples"
CRDS = Path(__file__).parent / "crds"
ADAPTER_VALUES = EXAMPLES / "prometheus-adapter-values.yaml"
# every values file a user installs the chart with: the defaults, then each example (the adapter's values
# are for prometheus-adapter's chart, not this one)
VALUES_FILES = [None] + sorted(p for p in EXAMPLES.glob("*.yaml") if p != ADAPTER_VALUES)
VALUES_IDS = ["defaults"] + [p.stem for p in VALUES_FILES[1:]]
CORE_API_GROUPS = ("v1", "apps/v1", "batch/v1", "autoscaling/v2", "rbac.authorization.k8s.io/v1")


def tool(name: str) -> str:
    """The tool beside this interpreter (a venv's bin), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found beside {sys.executable} or on PATH: run `make test-chart`, which installs it")
    return found


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, check=False)


def template_args(values: Path | None, *sets: str) -> list[str]:
    args = ["template", "kiln", str(CHART), "--namespace", "llm"]
    if values is not None:
        args += ["-f", str(values)]
    for assignment in sets:
        args += ["--set", assignment]
    return args


def render(values: Path | None = None, *sets: str) -> list[dict]:
    result = helm(*template_args(values, *sets))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(docs: list[dict], kind: str) -> dict:
    matching = [doc for doc in docs if doc["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, rendered {len(matching)}"
    return matching[0]


def kiln_settings(docs: list[dict]) -> dict[str, str]:
    """The KILN_* settings ConfigMap of `kiln serve` (named like the release's fullname)."""
    name = workload(docs)["metadata"]["name"]
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)["data"]


def workload(docs: list[dict]) -> dict:
    (found,) = [
        doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet") and "epp" not in doc["metadata"]["name"]
    ]
    return found


def kiln_container(docs: list[dict]) -> dict:
    (container,) = workload(docs)["spec"]["template"]["spec"]["containers"]
    return container


def epp_config(docs: list[dict]) -> dict:
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-epp"))
    return yaml.safe_load(configmap["data"]["epp-config.yaml"])


def core_metrics_extractor(docs: list[dict]) -> dict:
    plugin = next(p for p in epp_config(docs)["plugins"] if p["type"] == "core-metrics-extractor")
    return plugin["parameters"]


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule
