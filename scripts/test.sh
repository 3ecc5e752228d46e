#!/usr/bin/env bash
# Set up a virtual environment from the project's own files and run every check:
# ruff, mypy, import-linter and the whole pytest suite (tests/llm in its own vLLM environment).
# Usage: bash scripts/test.sh [pytest args]  (with args, only the main suite runs, with them)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# The TPM attestation tests run a real software TPM: Debian's swtpm and tpm2-tools. The LLM tests watch
# vLLM's process tree with strace.
if ! command -v swtpm >/dev/null || ! command -v tpm2_quote >/dev/null || ! command -v strace >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== apt: swtpm tpm2-tools strace"
        apt-get install -y -q swtpm tpm2-tools strace >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q swtpm tpm2-tools strace >/dev/null; }
    else
        echo "warning: swtpm/tpm2-tools/strace missing and cannot be installed here; their tests will skip" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e '.[torch,onnx,tensorflow,tvm,openvino,keyserver,agent,serve,remote,ray,nvidia,test]'
# TF Serving's client package, for the tests that use it against modelseal serve: it requires the full
# `tensorflow` package, which tensorflow-cpu (above) provides under another name
.venv/bin/python -m pip install -q --no-deps -c constraints.txt tensorflow-serving-api
# The LLM engine tests (tests/llm) get their own environment, frozen in requirements-vllm.lock (which says
# why it cannot share .venv); MODELSEAL_SKIP_LLM=1 leaves it out on a machine without room for it.
if [ "${MODELSEAL_SKIP_LLM:-0}" != 1 ]; then
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv-vllm/bin/python -m pip install -q --no-deps -r requirements-vllm.lock
    .venv-vllm/bin/python -m pip install -q --no-deps -e .
fi
# Triton (tests/triton): nvidia-pytriton's tritonserver lives in .venv-triton, frozen in requirements-triton.lock
# (PyTriton pins numpy<2); the Python-backend tests run in .venv and take only the server from there.
# MODELSEAL_SKIP_TRITON=1 leaves it out (those tests then skip).
if [ "${MODELSEAL_SKIP_TRITON:-0}" != 1 ]; then
    [ -x .venv-triton/bin/python ] || "$PY" -m venv .venv-triton
    .venv-triton/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv-triton/bin/python -m pip install -q --no-deps -r requirements-triton.lock
    .venv-triton/bin/python -m pip install -q --no-deps -e .
    export MODELSEAL_TRITON_ENV="$PWD/.venv-triton"
fi
export ORT_DISABLE_TELEMETRY=1
echo "== ruff";  .venv/bin/ruff check src tests bench
echo "== mypy";  .venv/bin/mypy
echo "== import-linter"; .venv/bin/lint-imports
echo "== pytest"
.venv/bin/python -m pytest -n 2 -q "$@"
if [ "${MODELSEAL_SKIP_TRITON:-0}" != 1 ] && [ $# -eq 0 ]; then
    echo "== pytest: PyTriton in .venv-triton"
    LD_LIBRARY_PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        .venv-triton/bin/python -m pytest -q tests/triton/test_pytriton.py
fi
if [ "${MODELSEAL_SKIP_LLM:-0}" != 1 ] && [ $# -eq 0 ]; then
    echo "== pytest: LLM engines (vLLM, transformers) in .venv-vllm"
    .venv-vllm/bin/python -m pytest -q tests/llm
fi
