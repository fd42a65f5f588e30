#!/usr/bin/env bash
# Install gere-ds with its test extras into .venv and run the whole test suite
# (unit tests, real multi-rank DeepSpeed runs on CPU, the real-model smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test,assets
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest -q -rs --timeout 1800 "$@"
