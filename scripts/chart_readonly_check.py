"""Run the Helm chart's kiln pod under Docker as Kubernetes would: read-only root, uid 10001, and exactly the
writable volumes the chart renders, then one chat completion and a SIGTERM drain.

    python -m scripts.chart_readonly_check --image kiln [--values deploy/helm/kiln/examples/x.yaml]

Needs helm (python -m scripts.install_deploy_tools) and a Docker engine (../shared/ci/docker-engine.sh has
no bridge network, so containers share the host's). The Deployment's init containers run first, one
container each, then the serving container; every emptyDir becomes a host folder owned by the pod's
fsGroup (what the kubelet does), readOnly mounts stay read-only, env and envFrom come from the rendered
ConfigMap. Any write outside those volumes fails with EROFS, so a passing run shows the volumes suffice.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "kiln"


def helm() -> str:
    local = Path(sys.executable).parent / "helm"
    found = str(local) if local.is_file() else shutil.which("helm")
    if found is None:
        raise SystemExit("helm not found: run python -m scripts.install_deploy_tools")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(image: str, port: int, values: list[str]) -> list[dict]:
    repository, _, tag = image.partition(":")
    args = [helm(), "template", "ro", str(CHART), "--set", f"image.repository={repository}"]
    args += ["--set", f"image.tag={tag or 'latest'}", "--set", f"service.port={port}"]
    for path in values:
        args += ["-f", path]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def container_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
    for item in container.get("env", []):
        if "value" not in item:
            raise SystemExit(f"env {item['name']} comes from {item.get('valueFrom')}: not emulated here")
        env[item["name"]] = item["value"]
    return env


def docker_args(container: dict, pod: dict, host_dirs: dict[str, Path], configmaps: dict[str, dict]) -> list[str]:
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    args = ["--network", "host", "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    if "fsGroup" in security:
        args += ["--group-add", str(security["fsGroup"])]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if security.get("capabilities", {}).get("drop") == ["ALL"]:
        args += ["--cap-drop", "ALL"]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for mount in container.get("volumeMounts", []):
        suffix = ":ro" if mount.get("readOnly") else ""
        args += ["-v", f"{host_dirs[mount['name']]}:{mount['mountPath']}{suffix}"]
    for name, value in container_env(container, configmaps).items():
        args += ["-e", f"{name}={value}"]
    if "command" in container:
        args += ["--entrypoint", container["command"][0]]
        return args + [container["image"], *container["command"][1:], *container.get("args", [])]
    return args + [container["image"], *container.get("args", [])]


def emptydir_folders(pod: dict, root: Path) -> dict[str, Path]:
    """One host folder per volume, owned by the fsGroup with the setgid bit, as the kubelet makes an emptyDir."""
    group = pod["securityContext"]["fsGroup"]
    folders = {}
    for volume in pod["volumes"]:
        if "emptyDir" not in volume:
            raise SystemExit(f"volume {volume['name']} is not an emptyDir: render with emptyDir volumes")
        folder = root / volume["name"]
        folder.mkdir()
        shutil.chown(folder, group=group)
        folder.chmod(0o2777 if volume["name"] == "tmp" else 0o2775)
        folders[volume["name"]] = folder
    return folders


def wait_ready(port: int, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
        if state.stdout.strip() != "true":
            raise SystemExit(f"{name} exited before it was ready:\n" + logs(name))
        time.sleep(2)
    raise SystemExit(f"{name} not ready after {timeout:.0f} s:\n" + logs(name))


def logs(name: str, tail: str = "40") -> str:
    result = subprocess.run(["docker", "logs", "--tail", tail, name], capture_output=True, text=True)
    return result.stdout + result.stderr


def refuse_writes_outside_volumes(output: str, container: str) -> None:
    """kiln degrades rather than fails on some refused writes (a kernel falls back to torch), so its log
    is searched for the error too."""
    errors = [line for line in output.splitlines() if "Read-only file system" in line]
    if errors:
        raise SystemExit(f"{container} tried to write outside its volumes:\n" + "\n".join(errors))


def chat(port: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0
    )
    return reply.choices[0].message.content or ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="kiln")
    parser.add_argument("--values", action="append", default=[])
    parser.add_argument("--ready-timeout", type=float, default=600)
    options = parser.parse_args()

    port = free_port()
    docs = render(options.image, port, options.values)
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    pod = workload["spec"]["template"]["spec"]
    name = f"kiln-chart-ro-{port}"
    with tempfile.TemporaryDirectory(prefix="kiln-chart-ro-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        folders = emptydir_folders(pod, root)
        for init in pod.get("initContainers", []):
            print(f"init container {init['name']} ...", flush=True)
            started = time.monotonic()
            run = subprocess.run(
                ["docker", "run", "--rm", *docker_args(init, pod, folders, configmaps)], capture_output=True, text=True
            )
            output = run.stdout + run.stderr
            if run.returncode != 0:
                raise SystemExit(f"init container {init['name']} failed ({run.returncode}):\n{output[-3000:]}")
            refuse_writes_outside_volumes(output, init["name"])
            print(f"init container {init['name']}: done in {time.monotonic() - started:.0f} s", flush=True)
        (serve,) = pod["containers"]
        subprocess.run(
            ["docker", "run", "-d", "--name", name, *docker_args(serve, pod, folders, configmaps)], check=True
        )
        try:
            started = time.monotonic()
            wait_ready(port, name, options.ready_timeout)
            print(f"ready in {time.monotonic() - started:.0f} s on port {port}", flush=True)
            print(f"chat completion: {chat(port)!r}", flush=True)
            stop = subprocess.run(
                ["docker", "stop", "-t", str(pod["terminationGracePeriodSeconds"]), name], capture_output=True
            )
            status = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True)
            print(f"SIGTERM: docker stop rc={stop.returncode}, kiln exit code {status.stdout.decode().strip()}")
            refuse_writes_outside_volumes(logs(name, tail="all"), serve["name"])
            written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.parent in folders.values())
            print("written to the volumes (top level):", ", ".join(written))
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    print("read-only check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
