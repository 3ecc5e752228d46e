#!/usr/bin/env bash
# Set up a virtual environment from the project's own files and run every check:
# ruff, mypy and the whole pytest suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e '.[torch,onnx,keyserver,agent,test]'
export ORT_DISABLE_TELEMETRY=1
echo "== ruff";  .venv/bin/ruff check src tests bench
echo "== mypy";  .venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -n 2 -q "$@"
