#!/usr/bin/env bash
# The prepared GPU check in one command (bench/gpu_check.py says what it runs and writes).
#
#   bash bench/gpu_check.sh                 # on the GPU machine: python3 there, results in $OUT
#   bash bench/gpu_check.sh --dry-run       # anywhere: the plumbing only
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run
#
# The project runs from this tree (PYTHONPATH), never installed; wheels brought along in
# .cache/gpu-wheels (bench/gpu_wheels.sh) are installed by the driver where the machine lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py "$@"
