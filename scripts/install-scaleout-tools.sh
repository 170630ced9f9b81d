#!/usr/bin/env bash
# The Debian tools `make test-scaleout` runs kiln replicas behind: haproxy and prometheus, installed with
# apt-get only when missing (CI runs as root). vllm-router comes from PyPI (pyproject's `scaleout` extra).
set -euo pipefail

missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v prometheus >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-scaleout-tools: ${missing[*]} missing and not root: apt-get install ${missing[*]}" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
