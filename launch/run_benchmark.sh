#!/usr/bin/env bash
# The continual benchmark of docs/results.md: every row of configs/bench/continual.yaml at several
# seeds on 2 CPU ranks, one run at a time, resumable. A finished run's small result files
# (config.yaml, metrics.json, outcomes.json, train_steps.jsonl, machine.json: the CPU it ran on,
# and states.json: the activation states each task end flipped, measured by `gere-ds states` on
# the run's task-end exports) are
# copied to docs/results/continual_med/<row>/seed<N>/ (committed) and its checkpoints and exports are
# deleted (1.8 GB and 0.27 GB each);
# then the tables and pictures are regenerated from every committed run:
#   python eval/compare.py --benchmark docs/results/continual_med
# A run whose results are already committed is skipped, so the script can be stopped (kill,
# pre-emption) and started again at will: an interrupted run resumes from its last checkpoint.
# Usage: bash launch/run_benchmark.sh [ROW:SEED ...]   (default: the plan below, in order)
# Another study of the same rows (configs/bench/adjective_rounds.yaml) runs with
#   CONFIG=<its config> RUNS=<its runs folder> KEEP=<its results folder> bash launch/run_benchmark.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/bench/continual.yaml}"
RUNS="${RUNS:-runs/bench/continual}"
KEEP="${KEEP:-docs/results/continual_med}"
# what makes each row: overrides of the one regime
declare -A ROW=(
  [none]="replay.strategy=none"
  [replay]="replay.strategy=replay"
  [tm_w100]="replay.strategy=tm replay.weight=100"
  [tm_dy]="replay.strategy=tm replay.weight=dy"
  [tm_dy_exact]="replay.strategy=tm replay.weight=dy replay.tm_dead_band=0"   # = tm_dy now
  [tm_dy_guard]="replay.strategy=tm replay.weight=dy replay.tm_dead_band=48"  # the opt-in guard
  [tm_w1]="replay.strategy=tm replay.weight=1"
  [tm_dy_k2]="replay.strategy=tm replay.weight=dy replay.threshold_k=2"
  [kl]="replay.strategy=kl replay.weight=1"
  [l2]="replay.strategy=l2 replay.weight=1"
  [lora_tm_dy]="replay.strategy=tm replay.weight=dy train.lora.r=16 train.lora.alpha=32
    train.lora.dropout=0.05 train.lora.continual=carry
    train.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
)
# first the pairs that answer "does GeRe help" at 3 seeds, then the other strategies, TM's
# weight (1, dy, 100) and threshold width (k = 1, 2) against what the model learns, and GeRe
# with LoRA adapters (docs/lora.md) instead of full fine-tuning; then more seeds of the rows
# that turned out to matter. tm_dy is the reference's exact TM test (the default); tm_dy_guard is
# the opt-in rounding guard at 48 bf16 units, measured against it
PLAN=(none:1 replay:1 tm_dy:1 none:2 replay:2 tm_dy:2 none:3 replay:3 tm_dy:3
      tm_dy_guard:1 tm_dy_guard:2 tm_dy_guard:3
      tm_w100:1 tm_w1:1 tm_dy_k2:1 kl:1 l2:1 lora_tm_dy:1
      tm_w100:2 kl:2 l2:2 tm_w1:2 tm_w1:3 tm_w100:3 kl:3 l2:3)
ITEMS=("${@:-${PLAN[@]}}")
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
finished() {  # metrics.json of a run that completed every task
  [ -f "$1" ] && python3 - "$1" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
sys.exit(0 if m.get("completed_tasks") == len(m.get("tasks", [])) else 1)
PY
}
for item in "${ITEMS[@]}"; do
  row="${item%%:*}"; seed="${item##*:}"
  [ -n "${ROW[$row]+x}" ] || { echo "unknown row '$row'; rows: ${!ROW[*]}" >&2; exit 2; }
  keep="$KEEP/$row/seed$seed"; out="$RUNS/$row/seed$seed"
  if [ -f "$keep/metrics.json" ]; then echo "[bench] $row seed $seed: already in $keep"; continue; fi
  if ! finished "$out/metrics.json"; then  # a finished run is not relaunched (it would evaluate again)
    echo "[bench] $(date -u +%H:%M:%S) $row seed $seed -> $out"
    mkdir -p "$out"
    # shellcheck disable=SC2086  # the row's overrides are words
    .venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29733}" launch/train.py \
      --config "$CONFIG" ${ROW[$row]} "train.seed=$seed" "output_dir=$out" \
      "replay.teacher_cache=$RUNS/teacher" checkpoint.export_hf=true >> "$out.launch.log" 2>&1
    finished "$out/metrics.json" || { echo "[bench] $row seed $seed unfinished" >&2; exit 1; }
  fi
  # which activation states each task end flipped from the base model's (gere-ds states), on
  # replay and held-out texts, from the run's Hugging Face exports of its task ends; at k = 1
  # for every row, so that a row trained with other thresholds is measured like the rest
  ends=()
  for hf in "$out"/hf/task*; do [ -d "$hf" ] && ends+=("$(basename "$hf")=$hf"); done
  if [ ${#ends[@]} -gt 0 ]; then
    .venv/bin/gere-ds states --config "$out/config.yaml" --out "$out/states" --samples 64 \
      --threshold-k 1 --heldout assets/data/general/heldout.jsonl "${ends[@]}" >> "$out.launch.log" 2>&1 ||
      { echo "[bench] $row seed $seed: gere-ds states failed (see $out.launch.log)" >&2; exit 1; }
  fi
  mkdir -p "$keep"
  [ -f "$out/states/states.json" ] && cp "$out/states/states.json" "$keep/"
  cp "$out/"{config.yaml,metrics.json,outcomes.json,train_steps.jsonl} "$keep/"
  # the machine it ran on: bf16 kernels differ between CPUs (AMX or not), and so, slightly, do
  # the base model's scores
  # (written by Python, not through stdout, where DeepSpeed may log on import)
  .venv/bin/python -c "import json, sys, pathlib; sys.path.insert(0, 'bench'); import common; \
pathlib.Path(sys.argv[1]).write_text(json.dumps(common.machine_info(), indent=2) + '\n')" \
    "$keep/machine.json"
  rm -rf "$out/checkpoints" "$out/hf"
  # shellcheck disable=SC2086  # extra flags are words (--allow-mixed-machines for a study whose
  # runs span machines, as the earlier BIG-bench one does)
  .venv/bin/python eval/compare.py --benchmark "$KEEP" ${COMPARE_ARGS:-} > /dev/null
  echo "[bench] $(date -u +%H:%M:%S) $row seed $seed done"
done
