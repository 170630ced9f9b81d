"""A stand-in for the `docker` CLI, for running scripts/gpu-check-trtllm.sh's whole flow on a CPU machine
(tests/test_scripts.py). It answers the commands that script uses, on this machine instead of in containers:

- `image inspect` reports the image config docker/Dockerfile.trtllm declares (its LD_LIBRARY_PATH ENV, ENTRYPOINT);
- `run --entrypoint python3 IMAGE ...` runs this Python in the repository with the recording fake of tensorrt_llm
  importable, volumes (-v SRC:DST) mapped to folders;
- `run IMAGE build ...` plays `kiln build --backend trtllm`, which needs a GPU: the two pairs TensorRT-LLM cannot build
  are refused in one sentence, the others leave an engine folder and kiln's summary line;
- `run -d IMAGE serve ...` runs the real `kiln serve` of the default model (the engine directory dropped) on the host
  port given by -p; `exec`, `inspect -f {{.State.Running}}`, `logs` and `rm -f` act on it.
State (volumes, containers) lives under FAKE_DOCKER_STATE.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ["FAKE_DOCKER_STATE"])
FAKE_TRTLLM = REPO / "tests" / "fake_trtllm"
REFUSED = {"int4-gptq": "int4-gptq needs a pre-quantized GPTQ checkpoint.", "int8-wo": "int8-wo with an fp8 KV cache."}


def main(args: list[str]) -> int:
    command, rest = args[0], args[1:]
    if command == "image":
        return image(rest)
    if command == "volume":
        (STATE / "volumes" / rest[-1]).mkdir(parents=True, exist_ok=True)
        return 0
    if command == "run":
        return run(rest)
    if command == "exec":
        name, argv = rest[0], rest[1:]
        port = json.loads((STATE / "containers" / name / "info.json").read_text())["port"]
        return subprocess.call([sys.executable, *(a.replace(":8000/", f":{port}/") for a in argv[1:])])
    if command == "inspect":
        print("true" if alive(rest[-1]) else "false")
        return 0
    if command == "logs":
        sys.stdout.write((STATE / "containers" / rest[-1] / "log").read_text())
        return 0
    if command == "rm":
        stop(rest[-1])
        return 0
    print(f"fake docker: unsupported command {args}", file=sys.stderr)
    return 125


def image(args: list[str]) -> int:
    if os.environ.get("FAKE_DOCKER_NO_IMAGE"):
        print(f"Error: No such image: {args[-1]}", file=sys.stderr)
        return 1
    template = args[args.index("--format") + 1] if "--format" in args else ""
    if "Config.Env" in template:
        print("PATH=/usr/local/bin:/usr/bin:/bin\nLD_LIBRARY_PATH=/usr/local/tensorrt/lib:/usr/local/nvidia/lib64")
    elif "Config.Entrypoint" in template:
        print('["kiln"]')
    return 0


def run(args: list[str]) -> int:
    volumes, entrypoint, name, port, detach = {}, None, None, None, False
    i = 0
    while args[i].startswith("-"):
        flag = args[i]
        if flag in ("--rm", "-i", "-d") or flag.startswith("--ipc"):
            detach = detach or flag == "-d"
            i += 1
            continue
        value = args[i + 1]
        if flag == "-v":
            source, target = value.split(":")[:2]
            volumes[target] = source if source.startswith("/") else str(STATE / "volumes" / source)
        elif flag == "--entrypoint":
            entrypoint = value
        elif flag == "--name":
            name = value
        elif flag == "-p":
            port = int(value.split(":")[1])
        i += 2
    argv = [mapped(arg, volumes) for arg in args[i + 1 :]]  # args[i] is the image
    env = os.environ | {"PYTHONPATH": str(FAKE_TRTLLM)}
    if entrypoint == "python3":
        return subprocess.call([sys.executable, *argv], cwd=REPO, env=env)
    if argv[0] == "build":
        return build(argv)
    assert argv[0] == "serve" and detach and name and port, args
    serve = [a for j, a in enumerate(argv[1:]) if a != "--engine-dir" and argv[j] != "--engine-dir"]
    folder = STATE / "containers" / name
    folder.mkdir(parents=True)
    with open(folder / "log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (folder / "info.json").write_text(json.dumps({"pid": process.pid, "port": port}))
    print(name)
    return 0


def build(argv: list[str]) -> int:
    precision = argv[argv.index("--precision") + 1] if "--precision" in argv else "auto"
    if precision in REFUSED:
        print(f"kiln build: {REFUSED[precision]}", file=sys.stderr)
        return 2
    output = Path(argv[argv.index("--output") + 1])
    output.mkdir(parents=True)
    print(f"Engine {output} was built: fp8 weights, fp8 KV cache, for a fake GPU. Serve it with `kiln serve`.")
    return 0


def mapped(arg: str, volumes: dict[str, str]) -> str:
    for target, source in volumes.items():
        if arg == target or arg.startswith(target + "/"):
            return source + arg[len(target) :]
    return arg


def alive(name: str) -> bool:
    """The server runs (a zombie, ended but not yet reaped by whoever inherited it, does not)."""
    info = STATE / "containers" / name / "info.json"
    if not info.is_file():
        return False
    try:
        stat = Path(f"/proc/{json.loads(info.read_text())['pid']}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(name: str) -> None:
    """SIGTERM, as `docker rm -f` gives a container's process; SIGKILL after 60 s."""
    if not alive(name):
        return
    pid = json.loads((STATE / "containers" / name / "info.json").read_text())["pid"]
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while alive(name):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
