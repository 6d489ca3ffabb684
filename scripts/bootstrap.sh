#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with everything lemoe-easyedit needs.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # GPU users: TORCH_SPEC=torch==<your build> or keep theirs
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
# easyeditor's metadata pins wheels that do not exist for Python 3.11: install it alone,
# its real needs come with this package.
"$VENV/bin/python" -m pip install -q --no-deps easyeditor==0.0.1.dev0
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "ready: $VENV"
