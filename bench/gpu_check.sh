#!/usr/bin/env bash
# Check a new GPU node in one command (390 s on one H200 with four throughput variants; the default runs three); see bench/gpu_check.py.
#   bash bench/gpu_check.sh [--layers N] [--variants ...] [--skip tiny,evaluate,engine,throughput,spread]
set -euo pipefail
cd "$(dirname "$0")/.."
export TIKTOKEN_CACHE_DIR=""
exec python bench/gpu_check.py "$@"
