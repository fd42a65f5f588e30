#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install gere-ds into it.
# Torch first: an already-importable torch is kept, else the CPU wheel torch==2.13.0
# (an unpinned torch from the registry would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! $PY -c "import torch" 2>/dev/null; then
  if python3 -c "import torch" 2>/dev/null; then
    # reuse the system torch: expose system site-packages to the venv
    python3 -m venv --system-site-packages .venv
  else
    $PY -m pip install -q "torch==2.13.0"
  fi
fi
if [ -n "$EXTRAS" ]; then
  $PY -m pip install -q -e ".[${EXTRAS}]" -c constraints.txt
else
  $PY -m pip install -q -e . -c constraints.txt
fi
