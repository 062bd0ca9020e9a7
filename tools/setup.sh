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
