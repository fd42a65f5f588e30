#!/usr/bin/env bash
# Regenerates the strategy comparison of docs/results.md: the paper's rows on the demo model and
# task sequence with a SHORT schedule (so that it fits a 2-core CPU), for each seed, then one
# table with mean ± std over the seeds and the training dynamics of the replay terms. The runs
# (checkpoints, TensorBoard) stay in runs/comparison/; each run's small result files
# (metrics.json, train_steps.jsonl, config.yaml) are copied to results/comparison/ (committed),
# and the tables (compare.md, dynamics.md, .png) are made from those copies.
# Usage: bash launch/run_comparison.sh [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=("${@:-1 2}")
ROWS=none,replay,replay_kl_w1,replay_l1_w1,replay_l2_w1,replay_tm_w1,replay_tm_w100,replay_tm_wdy
# (gradient checkpointing off: the 135M model fits easily and the rows run ~25% faster; only the
# last task-end checkpoint is kept: each one is 1.5 GB with its fp32 Adam states)
SHORT=(train.max_steps_per_task=10 train.lr=5.0e-5 train.warmup_steps=2 train.max_source_len=192
       train.gradient_checkpointing=false replay.num_samples=200 replay.max_len=64
       eval.max_examples=32 eval.general.0.max_examples=48 eval.general.1.max_examples=16
       checkpoint.every_steps=0 checkpoint.keep_task_ends=1)
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
.venv/bin/python launch/prepare_assets.py
# TM with the reference's exact test (no dead-band) next to the default rows: what the band costs
EXACT=(replay_tm_w100 replay_tm_wdy)
for seed in ${SEEDS[*]}; do
  .venv/bin/python launch/run_ablation.py --rows "$ROWS" --results "runs/comparison/seed$seed" \
    --launcher-args "--master_port ${MASTER_PORT:-29611}" \
    --keep-going "${SHORT[@]}" "train.seed=$seed"
  for row in "${EXACT[@]}"; do
    out="runs/comparison/seed$seed/${row}_exact"
    [ -f "$out/metrics.json" ] && continue
    .venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29611}" launch/train.py \
      --config "configs/ablation/$row.yaml" "${SHORT[@]}" "train.seed=$seed" \
      "output_dir=$out" "replay.teacher_cache=runs/comparison/seed$seed/teacher" \
      replay.tm_dead_band=0 > "runs/comparison/seed$seed/${row}_exact.launch.log" 2>&1 || true
  done
done
runs=(); names=()
for row in ${ROWS//,/ } "${EXACT[@]/%/_exact}"; do
  for seed in ${SEEDS[*]}; do
    if [ -f "runs/comparison/seed$seed/$row/metrics.json" ]; then
      keep="results/comparison/seed$seed/$row"
      mkdir -p "$keep"
      cp "runs/comparison/seed$seed/$row/"{metrics.json,train_steps.jsonl,config.yaml} "$keep/"
      runs+=("$keep"); names+=("$row")
    fi
  done
done
names_csv="$(IFS=,; echo "${names[*]}")"
.venv/bin/python eval/compare.py "${runs[@]}" --names "$names_csv" --out results/comparison
.venv/bin/python eval/dynamics.py "${runs[@]}" --names "$names_csv" --out results/comparison
