#!/usr/bin/env bash
# `make test-docker`: compose.yaml end to end on a real Docker engine, as CI runs it.
#
#   1. build the image (docker/Dockerfile);
#   2. first `docker compose up -d --wait`: the build service compiles the engine, the server turns healthy;
#   3. the OpenAI checks with the official SDK against the container (a chat completion, a streamed one,
#      /metrics, /v1/metadata, errors, timing: scripts/openai_checks.py);
#   4. `down` and a second `up`: the engine in the volume is reused;
#   5. bad settings (a model folder that is not there, a precision this machine cannot build): `up` fails,
#      the build says why in one line, and the server container is never started;
#   6. `docker compose down -v`, also when a step fails.
# Prints the time of each step. Needs Docker with Compose v2 (CI: bash ../shared/ci/docker-engine.sh) and
# the host's network for containers (.ci/compose.host-network.yaml: CI's engine has no bridge), and
# PYTHON with the openai SDK (make install's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PROJECT=${KILN_COMPOSE_PROJECT:-kiln-check}
export KILN_PORT=${KILN_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
compose=(docker compose -p "$PROJECT" --env-file /dev/null -f compose.yaml -f .ci/compose.host-network.yaml)
# neither a .env file (--env-file /dev/null above) nor KILN_* variables of this shell change what is checked
for name in $(compgen -e | grep '^KILN_' | grep -v '^KILN_PORT$' || true); do unset "$name"; done

timings=()
step() {  # step NAME COMMAND...: run it, record its wall time
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  timings+=("| $name | $((SECONDS - start)) |")
}
cleanup() {
  status=$?
  if [ $status -ne 0 ]; then
    echo "-- compose-check failed (exit $status); the containers' last logs:" >&2
    "${compose[@]}" logs --tail 40 >&2 || true
  fi
  "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  exit $status
}
trap cleanup EXIT

# expect_build_refusal VARIABLE=VALUE SENTENCE: up fails, the build's only output line is SENTENCE, the
# server was created but never started
expect_build_refusal() {
  local setting=$1 sentence=$2
  if env "$setting" "${compose[@]}" up -d --wait >/dev/null 2>&1; then
    echo "compose up with $setting succeeded; it must fail" >&2
    return 1
  fi
  local logs
  logs=$("${compose[@]}" logs --no-log-prefix build)
  if [ "$logs" != "$sentence" ]; then
    printf 'with %s the build said:\n%s\nexpected exactly:\n%s\n' "$setting" "$logs" "$sentence" >&2
    return 1
  fi
  local server_state
  server_state=$(docker inspect --format '{{.State.Status}} {{.State.StartedAt}}' "$("${compose[@]}" ps -a -q server)")
  case $server_state in
    "created 0001-01-01T00:00:00Z") echo "$setting: build refused in one line, server never started" ;;
    *) echo "with $setting the server container is '$server_state'; it must never start" >&2; return 1 ;;
  esac
  "${compose[@]}" down >/dev/null 2>&1
}

"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
step "image build" "${compose[@]}" build
step "first up (engine build, server healthy)" "${compose[@]}" up -d --wait
"${compose[@]}" logs --no-log-prefix build | tail -1
step "OpenAI checks (SDK, streaming, /metrics, /v1/metadata)" \
  "$PYTHON" scripts/openai_checks.py --url "http://127.0.0.1:$KILN_PORT"
"${compose[@]}" down
step "second up (engine reused, server healthy)" "${compose[@]}" up -d --wait
"${compose[@]}" logs --no-log-prefix build | tail -1 | grep -q "is up to date" \
  || { echo "the second up rebuilt the engine instead of reusing it" >&2; exit 1; }
"$PYTHON" scripts/openai_checks.py --url "http://127.0.0.1:$KILN_PORT" --no-timing | tail -1
"${compose[@]}" down
step "bad KILN_MODEL refused" expect_build_refusal KILN_MODEL=/models/not-there \
  "kiln build: Model folder '/models/not-there' does not exist (in a container: is it mounted?)."
step "bad KILN_PRECISION refused" expect_build_refusal KILN_PRECISION=nvfp4 \
  "kiln build: --precision nvfp4 needs --backend trtllm and an NVIDIA GPU with SM >= 100; kiln's torch engine builds fp32, bf16, fp8, int8-wo, int8-sq, int4-rtn, int4-awq, int4-gptq."
docker compose -f compose.gpu.yaml config --quiet  # the GPU variant at least parses (it cannot run here)

echo
echo "| step | seconds |"
echo "|---|---:|"
printf '%s\n' "${timings[@]}"
echo "compose check passed"
