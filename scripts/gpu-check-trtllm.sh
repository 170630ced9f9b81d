#!/usr/bin/env bash
# The TensorRT-LLM device check: build an FP8 engine (INT8 SmoothQuant on Ampere) of a small model
# with `kiln build --backend trtllm`, serve it, run scripts/openai_checks.py against it and print a
# summary. Meant to run inside the docker/Dockerfile.trtllm image, or on any machine where
# `python3 -c "import tensorrt_llm"` works and nvidia-smi sees a GPU:
#
#   docker run --rm --gpus all --entrypoint bash kiln-trtllm scripts/gpu-check-trtllm.sh
#   MODEL=/models/my-hf-folder ENGINE_DIR=/engines/mine PORT=8001 scripts/gpu-check-trtllm.sh
#
# Environment: MODEL (default: kiln's embedded SmolLM2-135M-Instruct), ENGINE_DIR (default: a temp
# folder, removed when every check passed), PORT (default 8000), PYTHON (default python3), PRECISION
# and KV_CACHE_DTYPE (default: chosen from the GPU's compute capability, as below).
# Exit status: 0 when every check passed, 1 when a check failed, 2 when this machine cannot run it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PORT=${PORT:-8000}
READY_TIMEOUT_S=600  # a first start on a clean machine converts the GGUF model and loads the engine

die() { echo "gpu-check-trtllm: $*" >&2; exit 2; }

# tensorrt_llm first: it is the cheapest gate to test without a GPU, and without it nothing else matters.
"$PY" -c "import tensorrt_llm" >/dev/null 2>&1 \
  || die "$PY cannot import tensorrt_llm; run this inside the docker/Dockerfile.trtllm image (or install TensorRT-LLM)."
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi is not on PATH; no NVIDIA GPU is visible (docker run --gpus all?)."
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1) || true
[[ -n "$GPU" ]] || die "nvidia-smi sees no GPU; check the driver and that the container was started with --gpus all."

# SM as an integer (8.9 -> 89), from the first GPU: that is the one kiln serves on.
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' ')
[[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]] || die "could not read the GPU's compute capability (nvidia-smi said '$CAP')."
SM=$(( ${CAP%%.*} * 10 + ${CAP#*.} ))
if (( SM >= 89 )); then
  AUTO_PRECISION=fp8 AUTO_KV=fp8            # Ada and Hopper have FP8 tensor cores
elif (( SM >= 80 )); then
  AUTO_PRECISION=int8-sq AUTO_KV=int8       # Ampere: SmoothQuant W8A8 with an INT8 KV cache
else
  die "$GPU has SM $SM; TensorRT-LLM quantized engines (FP8, INT8, INT4) need SM >= 80 (Ampere or newer)."
fi
PRECISION=${PRECISION:-$AUTO_PRECISION}
KV_CACHE_DTYPE=${KV_CACHE_DTYPE:-$AUTO_KV}

if command -v kiln >/dev/null 2>&1; then KILN=(kiln); else KILN=("$PY" -m server.cli); fi
# WORK holds the server log, the checks' JSON and (without ENGINE_DIR) the engine; it is removed
# after a run where everything passed and kept, for the log, otherwise.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-gpu-check-trtllm.XXXXXX")
ENGINE_DIR=${ENGINE_DIR:-$WORK/engine}
SERVER_PID=""
ALL_PASSED=""

cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ -n "$ALL_PASSED" ]]; then rm -rf "$WORK"; else echo "gpu-check-trtllm: logs kept in $WORK" >&2; fi
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

echo "== $GPU (SM $SM): kiln build --backend trtllm --precision $PRECISION --kv-cache-dtype $KV_CACHE_DTYPE"
BUILD=("${KILN[@]}" build --backend trtllm --precision "$PRECISION" --kv-cache-dtype "$KV_CACHE_DTYPE" --output "$ENGINE_DIR")
if [[ -n "${MODEL:-}" ]]; then BUILD+=(--model "$MODEL"); fi
started=$(now)
"${BUILD[@]}"
BUILD_S=$(elapsed "$started")

echo "== kiln serve --engine-dir $ENGINE_DIR --port $PORT"
LOG=$WORK/serve.log
"${KILN[@]}" serve --engine-dir "$ENGINE_DIR" --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER_PID=$!
URL=http://127.0.0.1:$PORT
started=$(now)
until "$PY" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$URL/v1/health/ready', timeout=5).status != 200)" 2>/dev/null; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    tail -n 40 "$LOG" >&2
    die "kiln serve exited before it was ready (log above)."
  fi
  if awk -v a="$started" -v b="$(now)" -v t="$READY_TIMEOUT_S" 'BEGIN { exit !(b - a > t) }'; then
    tail -n 40 "$LOG" >&2
    die "kiln serve was not ready within $READY_TIMEOUT_S s (log above)."
  fi
  sleep 1
done
LOAD_S=$(elapsed "$started")

echo "== scripts/openai_checks.py --url $URL"
CHECKS_RC=0
"$PY" scripts/openai_checks.py --url "$URL" --json "$WORK/checks.json" || CHECKS_RC=$?

kill -TERM "$SERVER_PID" 2>/dev/null || true
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""

# One short table for the issue: what was built, how long it took, what passed, how fast it serves.
"$PY" - "$WORK/checks.json" "$GPU" "$SM" "$PRECISION" "$KV_CACHE_DTYPE" "$BUILD_S" "$LOAD_S" <<'EOF'
import json, sys
path, gpu, sm, precision, kv, build_s, load_s = sys.argv[1:]
try:
    report = json.load(open(path))
except (OSError, ValueError):
    report = {"checks": [], "timing": [], "passed": 0, "failed": 0}
speed = {t["concurrency"]: f"{t['output_tok_per_s']:.1f}" for t in report["timing"]}
ttft = {t["concurrency"]: f"{t['ttft_p50_s']:.3f}" for t in report["timing"]}
total = report["passed"] + report["failed"]
print("\n| GPU | SM | precision | KV | build s | load s | checks passed | TTFT p50 c=1 s | tok/s c=1 | tok/s c=8 |")
print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
print(f"| {gpu} | {sm} | {precision} | {kv} | {build_s} | {load_s} | {report['passed']}/{total} | "
      f"{ttft.get(1, '-')} | {speed.get(1, '-')} | {speed.get(8, '-')} |")
EOF
if (( CHECKS_RC == 0 )); then ALL_PASSED=1; fi
exit "$CHECKS_RC"
