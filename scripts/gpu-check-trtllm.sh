#!/usr/bin/env bash
# The TensorRT-LLM device check (issue #22), run on a Docker host with an NVIDIA GPU and the NVIDIA Container
# Toolkit, after building the image once (the NVIDIA base image is ~20 GB; the check itself is meant to take under
# 10 minutes on one H100 or H200):
#
#   docker build -f docker/Dockerfile.trtllm -t kiln-trtllm .
#   scripts/gpu-check-trtllm.sh
#
# Why on the host and not inside the container: every kiln command here runs exactly as compose.gpu.yaml runs it,
# `docker run IMAGE <kiln arguments>` through the image's exec-form ENTRYPOINT ["kiln"], so no shell starts and only
# the image's Docker ENV applies. A shell inside the container (the old `--entrypoint bash` way) sources the base
# image's startup files (BASH_ENV, ENV), which is what hid the missing LD_LIBRARY_PATH of TensorRT's libraries. The
# HTTP checks (scripts/trtllm_checks.py, scripts/openai_checks.py) import no TensorRT-LLM; they run in the same image
# with python3 as the entrypoint, on the host network.
#
# Steps: the image's ENV and entrypoint; `import tensorrt_llm` with no shell; two refused precision/KV pairs; a real
# `kiln build --backend trtllm` at the default profile (auto); one with --gather-logits; `kiln serve` of the first
# with scripts/trtllm_checks.py (logprobs must be refused there); `kiln serve` of the second with the logprobs check
# and scripts/openai_checks.py. Prints one table (check | result | figure).
#
# Environment: IMAGE (default kiln-trtllm), GPUS (docker --gpus, default 1), PORT (host port, default 8000), MODEL (a
# Hugging Face model folder on this host; default: kiln's embedded SmolLM2-135M-Instruct), KEEP=1 keeps the engines'
# volume and the logs. Exit status: 0 when every check passed, 1 when one failed, 2 when this host cannot run it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-kiln-trtllm}
GPUS=${GPUS:-1}
PORT=${PORT:-8000}
READY_S=300 # loading a small engine takes seconds; the first start also converts the embedded model
RUN_ID=kiln-gpu-check-$$
VOLUME=$RUN_ID-engines
SERVER=""

die() {
  echo "gpu-check-trtllm: $*" >&2
  exit 2
}

command -v docker >/dev/null 2>&1 || die "docker is not on PATH; run this on the GPU host, not inside the image."
docker image inspect "$IMAGE" >/dev/null 2>&1 ||
  die "no image $IMAGE; build it first: docker build -f docker/Dockerfile.trtllm -t $IMAGE ."

WORK=$(mktemp -d "${TMPDIR:-/tmp}/$RUN_ID.XXXXXX")
chmod 0777 "$WORK" # the checks run as the image's user (kiln, uid 10001) and write their JSON here
ROWS=$WORK/rows.tsv
: >"$ROWS"
docker volume create "$VOLUME" >/dev/null

cleanup() {
  if [[ -n "$SERVER" ]]; then docker rm -f "$SERVER" >/dev/null 2>&1 || true; fi
  if [[ "${KEEP:-}" == 1 ]]; then
    echo "gpu-check-trtllm: kept volume $VOLUME and logs in $WORK" >&2
  else
    docker volume rm -f "$VOLUME" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

row() { # row CHECK PASS|FAIL FIGURE
  printf '%s\t%s\t%s\n' "$1" "$2" "$(tr '\n\t|' '   ' <<<"$3" | cut -c1-160 | sed 's/ *$//')" >>"$ROWS"
  echo "== $1: $2 ($3)"
}

# What compose.gpu.yaml gives both services: the GPUs, shared memory for TensorRT-LLM's processes, the engines' volume.
GPU_ARGS=(--gpus "$GPUS" --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v "$VOLUME:/engines")
MODEL_ARGS=()
if [[ -n "${MODEL:-}" ]]; then
  GPU_ARGS+=(-v "$(cd "$MODEL" && pwd):/models/check:ro")
  MODEL_ARGS=(--model /models/check)
fi

kiln() { # kiln ARGS...: the image's entrypoint, as compose runs it (no --entrypoint, no shell)
  docker run --rm "${GPU_ARGS[@]}" "$IMAGE" "$@"
}

python_in_image() { # python_in_image ARGS...: the HTTP checks, which need no GPU, on the host network
  docker run --rm -i --network host -v "$WORK:/out" --entrypoint python3 "$IMAGE" "$@"
}

# 1. The image: TensorRT's libraries in the Docker ENV, kiln as the exec-form entrypoint.
ENV_LINE=$(docker image inspect "$IMAGE" --format '{{range .Config.Env}}{{println .}}{{end}}' | grep '^LD_LIBRARY_PATH=' || true)
ENTRYPOINT=$(docker image inspect "$IMAGE" --format '{{json .Config.Entrypoint}}')
if [[ "$ENV_LINE" == LD_LIBRARY_PATH=/usr/local/tensorrt/lib:* && "$ENTRYPOINT" == '["kiln"]' ]]; then
  row "image ENV and entrypoint" PASS "$ENTRYPOINT; ${ENV_LINE:0:100}"
else
  row "image ENV and entrypoint" FAIL "entrypoint $ENTRYPOINT; ${ENV_LINE:-no LD_LIBRARY_PATH}"
fi

# 2. tensorrt_llm imports in a process the container runtime starts directly (python3 here, kiln under compose).
if out=$(docker run --rm --gpus "$GPUS" --entrypoint python3 "$IMAGE" -c \
  "import tensorrt_llm; from engines.trtllm import api; print('tensorrt_llm', api.load().version)" 2>&1); then
  row "import without a shell" PASS "$(tail -n1 <<<"$out")"
else
  row "import without a shell" FAIL "$(tail -n2 <<<"$out")"
fi

# 3. Pairs TensorRT-LLM cannot build are refused in one sentence (exit 2) before any GPU work. The sentence is the
# last line of stderr (TensorRT-LLM's import may log before it); a missing tensorrt_llm is not a refusal.
refused() { # refused NAME ARGS...
  local name=$1 rc=0 out last started=$SECONDS
  shift
  out=$(kiln build --backend trtllm "$@" --output /engines/refused "${MODEL_ARGS[@]}" 2>&1 >/dev/null) || rc=$?
  last=$(tail -n1 <<<"$out")
  if ((rc == 2)) && [[ "$last" == "kiln build: "* && "$last" != *"needs the tensorrt_llm package"* ]]; then
    row "refuse $name" PASS "$((SECONDS - started)) s: ${last#kiln build: }"
  else
    row "refuse $name" FAIL "exit $rc: $last"
  fi
}
refused "int4-gptq" --precision int4-gptq
refused "int8-wo + fp8 KV" --precision int8-wo --kv-cache-dtype fp8

# 4. Real builds: the default profile (what compose builds), and one that gathers generation logits.
built() { # built NAME OUTPUT ARGS...
  local name=$1 output=$2 started=$SECONDS out
  shift 2
  if out=$(kiln build --backend trtllm --output "/engines/$output" "${MODEL_ARGS[@]}" "$@" 2>"$WORK/$output-build.log"); then
    row "$name" PASS "$((SECONDS - started)) s: $(sed -n 's/^Engine [^ ]* \(.*\)\. Serve it.*/\1/p' <<<"$out")"
  else
    row "$name" FAIL "$((SECONDS - started)) s: $(tail -n1 "$WORK/$output-build.log")"
    return 1
  fi
}
DEFAULT_OK=1 LOGITS_OK=1
built "build, default profile" default || DEFAULT_OK=""
built "build --gather-logits" logits --gather-logits || LOGITS_OK=""

# 5. Serve an engine as compose's server service does, and run HTTP checks against it.
serve() { # serve ENGINE: start `kiln serve` in the background and wait until it is ready (or has exited)
  local started=$SECONDS
  SERVER=$RUN_ID-serve-$1
  docker run -d --name "$SERVER" "${GPU_ARGS[@]}" -p "127.0.0.1:$PORT:8000" "$IMAGE" \
    serve --engine-dir "/engines/$1" >/dev/null
  until docker exec "$SERVER" python3 -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/v1/health/ready', timeout=5).status != 200)" 2>/dev/null; do
    if [[ "$(docker inspect -f '{{.State.Running}}' "$SERVER" 2>/dev/null)" != true ]] || ((SECONDS - started > READY_S)); then
      row "serve $1" FAIL "not ready after $((SECONDS - started)) s: $(docker logs "$SERVER" 2>&1 | tail -n1)"
      return 1
    fi
    sleep 2
  done
  row "serve $1" PASS "ready in $((SECONDS - started)) s"
}
unserve() {
  docker logs "$SERVER" >"$WORK/$SERVER.log" 2>&1 || true
  docker rm -f "$SERVER" >/dev/null 2>&1 || true
  SERVER=""
}
checks() { # checks SCRIPT JSON ARGS...: run one of the check scripts; its rows go into the table
  local script=$1 json=$2
  shift 2
  python_in_image "scripts/$script" --url "http://127.0.0.1:$PORT" --wait "$READY_S" --json "/out/$json" "$@" \
    >"$WORK/$json.md" 2>&1 || true
  if [[ ! -s "$WORK/$json" ]]; then
    row "$script" FAIL "no results: $(tail -n1 "$WORK/$json.md")"
  fi
}

if [[ -n "$DEFAULT_OK" ]] && serve default; then
  checks trtllm_checks.py default.json --logprobs refused
fi
[[ -z "$SERVER" ]] || unserve
if [[ -n "$LOGITS_OK" ]] && serve logits; then
  checks trtllm_checks.py logits.json --only logprobs
  checks openai_checks.py openai.json
fi
[[ -z "$SERVER" ]] || unserve

# 6. One table: this script's rows, then every check of the JSON reports.
python_in_image - /out <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [line.split("\t") for line in (out / "rows.tsv").read_text().splitlines()]
for name, prefix in (("default.json", "default engine: "), ("logits.json", "logits engine: "), ("openai.json", "openai_checks: ")):
    if (out / name).is_file():
        for check in json.loads((out / name).read_text())["checks"]:
            figure = " ".join(str(check["detail"]).split())[:160].replace("|", "/")
            rows.append([prefix + check["check"], "PASS" if check["ok"] else "FAIL", figure])
print("\n| check | result | figure |\n|---|---|---|")
for check, result, figure in rows:
    print(f"| {check} | {result} | {figure} |")
failed = sum(result != "PASS" for _, result, _ in rows)
print(f"\n{len(rows) - failed}/{len(rows)} passed")
(out / "failed").write_text(str(failed))
EOF
[[ "$(cat "$WORK/failed" 2>/dev/null)" == 0 ]] || {
  KEEP=1
  exit 1
}
