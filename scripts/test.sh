#!/usr/bin/env bash
# Set up a virtual environment from the project's own files and run every check:
# ruff, mypy and the whole pytest suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# The TPM attestation tests run a real software TPM: Debian's swtpm and tpm2-tools.
if ! command -v swtpm >/dev/null || ! command -v tpm2_quote >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== apt: swtpm tpm2-tools"
        apt-get install -y -q swtpm tpm2-tools >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q swtpm tpm2-tools >/dev/null; }
    else
        echo "warning: swtpm/tpm2-tools missing and cannot be installed here; TPM tests will skip" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e '.[torch,onnx,tensorflow,keyserver,agent,serve,test]'
export ORT_DISABLE_TELEMETRY=1
echo "== ruff";  .venv/bin/ruff check src tests bench
echo "== mypy";  .venv/bin/mypy
echo "== import-linter"; .venv/bin/lint-imports
echo "== pytest"
.venv/bin/python -m pytest -n 2 -q "$@"
