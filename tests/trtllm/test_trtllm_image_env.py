"""docker/Dockerfile.trtllm gives every process TensorRT's libraries, not only shells (issue #22, item 1).

TensorRT-LLM's release image adds /usr/local/tensorrt/lib to LD_LIBRARY_PATH only in shell startup files
(docker/common/install_tensorrt.sh appends the export to "${ENV}"; docker/Dockerfile.multi sets ENV and BASH_ENV),
while compose runs the image's exec-form ENTRYPOINT ["kiln"], which starts no shell. No GPU or NVIDIA base image is
needed to hold the contract: the Dockerfile is parsed as Docker reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.dockerfile_helpers import instructions

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile.trtllm"
COMPOSE_GPU = REPO / "compose.gpu.yaml"
TENSORRT_LIB_ENV = "/usr/local/tensorrt/lib:${LD_LIBRARY_PATH}"


def env_assignments(arguments: str) -> dict[str, str]:
    """ENV KEY=VALUE [KEY=VALUE ...] (the form this Dockerfile uses; values without spaces)."""
    return dict(pair.split("=", 1) for pair in arguments.split())


def exec_form(arguments: str) -> list[str] | None:
    """The argv of an exec-form (JSON array) RUN/ENTRYPOINT/CMD, or None for the shell form."""
    try:
        argv = json.loads(arguments)
    except ValueError:
        return None
    return argv if isinstance(argv, list) and all(isinstance(a, str) for a in argv) else None


def test_tensorrt_libraries_are_a_docker_env_not_a_shell_startup_file():
    steps = instructions(DOCKERFILE)
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    values = [env_assignments(args).get("LD_LIBRARY_PATH") for kind, args in steps if kind == "ENV"]
    assert TENSORRT_LIB_ENV in values, (
        f"Dockerfile.trtllm must set `ENV LD_LIBRARY_PATH={TENSORRT_LIB_ENV}`: the base image puts TensorRT's "
        "libraries on the path only in bash/sh startup files, which the exec-form ENTRYPOINT never reads"
    )
    assert values.count(TENSORRT_LIB_ENV) == 1 and [v for v in values if v] == [TENSORRT_LIB_ENV]


def test_the_image_build_imports_tensorrt_llm_without_a_shell_after_the_env():
    steps = instructions(DOCKERFILE)
    env_at = next(
        (
            i
            for i, (kind, args) in enumerate(steps)
            if kind == "ENV" and env_assignments(args).get("LD_LIBRARY_PATH") == TENSORRT_LIB_ENV
        ),
        None,
    )
    assert env_at is not None, f"no `ENV LD_LIBRARY_PATH={TENSORRT_LIB_ENV}` for the import check to follow"
    install_at = next(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install --no-deps -e" in args)
    checks = [
        i
        for i, (kind, args) in enumerate(steps)
        if kind == "RUN"
        and (argv := exec_form(args)) is not None
        and argv[:2] == ["python3", "-c"]
        and "import torch, tensorrt_llm" in argv[2]
        and "api.load()" in argv[2]
    ]
    assert checks, "the image build must import tensorrt_llm in an exec-form RUN (no shell, no BASH_ENV)"
    assert all(i > env_at and i > install_at for i in checks)


def test_compose_runs_the_exec_form_entrypoint_with_exec_form_commands():
    steps = instructions(DOCKERFILE)
    entrypoints = [exec_form(args) for kind, args in steps if kind == "ENTRYPOINT"]
    assert entrypoints == [["kiln"]]
    compose = yaml.safe_load(COMPOSE_GPU.read_text())
    for name, service in compose["services"].items():
        assert "entrypoint" not in service, f"{name} must run the image's entrypoint, as the check script does"
        assert isinstance(service["command"], list), f"{name}'s command must be exec form (a list)"
