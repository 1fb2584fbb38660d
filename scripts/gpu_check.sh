#!/usr/bin/env bash
# The one GPU check: scripts/gpu_check.py (its docstring says what it measures). Results go to
# $OUT, else runs/gpu_check. Usage: scripts/gpu_check.sh [--dry-run] [--only SECTIONS] [--out DIR] [--data DIR]
# On the lent GPU machine, after the dependencies are installed (../shared/device/README.md; pack
# them with: bash ../shared/device/pack-gpu-deps.sh pynvvideocodec):
#   export PYTHONPATH=/tmp/site && bash scripts/gpu_check.sh --data /tmp/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
