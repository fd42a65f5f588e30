#!/usr/bin/env bash
# GPU acceptance check of gere-ds on a machine that has only torch (with CUDA) installed and no
# network: install, then the real training path end to end (bench/gpu_check.py), one JSON.
#
# 1. On a machine with network, from the repository root: gere-ds and every dependency except
#    torch as wheels into one folder (carried to the GPU machine with the repository):
#       bash bench/gpu_check.sh --build-wheels wheels
#    (= pip wheel --no-deps . -w wheels, then pip wheel --no-deps --no-build-isolation of every
#    package of this machine's working .venv except torch/triton/nvidia-*, so packages published
#    only as source, deepspeed among them, arrive built; setuptools and wheel go along for any
#    source build left. Build on the same OS, CPU architecture and Python as the GPU machine.)
# 2. On the GPU machine:
#       bash bench/gpu_check.sh --wheels wheels
#    installs from the wheels only (--no-index) into .venv-gpu (system torch visible), runs
#    bench/gpu_check.py on every visible GPU: bf16, `deepspeed: auto` and each of
#    ds_configs/zero2_gpu.json and zero3_gpu.json, 2 tasks x 3 steps with a checkpoint every 2,
#    killed and re-run to resume, multi-rank evaluation in rank and generate mode, export; it
#    writes bench/results/gpu_check.json. Then the tiny multi-rank test subset on NCCL and a
#    bf16 throughput probe (tokens/s, MFU).
#   bash bench/gpu_check.sh --dry-run   prints every step (no CUDA call); --cpu runs them on the
#   CPU (2 ranks over gloo; --configs zero3 for one config only); --out FILE, --work DIR and
#   --model DIR go to bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=run WHEELS=wheels CPU=0 CONFIGS=auto,zero2,zero3 PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-wheels) MODE=build; WHEELS="${2:?folder}"; shift 2 ;;
    --wheels) WHEELS="${2:?folder}"; shift 2 ;;
    --dry-run) MODE=dry; shift ;;
    --cpu) CPU=1; shift ;;
    --configs) CONFIGS="${2:?auto,zero2,zero3}"; shift 2 ;;
    --out|--work|--model) PASS+=("$1" "${2:?value}"); shift 2 ;;  # bench/gpu_check.py's
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
run() { if [ "$MODE" = dry ]; then echo "+ $*"; else "$@"; fi; }

if [ "$MODE" = build ]; then
  mkdir -p "$WHEELS"
  PY=.venv/bin/python  # the tested environment (bash scripts/test.sh made it)
  $PY -m pip wheel -q --no-deps . -w "$WHEELS"
  $PY -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-)' \
      | grep -v ' @ ' > "$WHEELS/requirements.txt"
  # wheels, built here from source where a package has no wheel (deepspeed: an sdist whose
  # build imports torch, hence no build isolation)
  $PY -m pip wheel -q --no-deps --no-build-isolation -r "$WHEELS/requirements.txt" -w "$WHEELS"
  $PY -m pip download -q --no-deps setuptools wheel -d "$WHEELS"
  echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files (torch not included)"
  exit 0
fi

if [ "$CPU" = 1 ]; then
  ACC=cpu NGPU=2
else
  run $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
  ACC=cuda
  NGPU=$([ "$MODE" = dry ] && echo '<GPUs>' || $PY -c "import torch; print(min(2, torch.cuda.device_count()))")
fi
VENV=.venv-gpu
if [ "$CPU" = 1 ] && [ -x .venv/bin/python ]; then VENV=.venv; fi
if [ ! -x "$VENV/bin/python" ] || [ "$MODE" = dry ]; then
  run $PY -m venv --system-site-packages "$VENV"
  # the build tools first, from the folder, for any package that arrived as source
  run "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" setuptools wheel
  run "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" \
      --no-build-isolation "gere-ds[test]" -c constraints.txt
fi
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false GERE_TEST_ACCELERATOR=$ACC
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
DRIVER_PY="$VENV/bin/python"
if [ "$MODE" = dry ] && [ ! -x "$DRIVER_PY" ]; then DRIVER_PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo "$PY"); fi
echo "== the training path on $ACC ($([ "$ACC" = cuda ] && echo NCCL || echo gloo)): $CONFIGS"
CHECK=(bench/gpu_check.py --configs "$CONFIGS" ${PASS[@]+"${PASS[@]}"})
[ "$CPU" = 1 ] && CHECK+=(--cpu)
[ "$MODE" = dry ] && CHECK+=(--dry-run)
"$DRIVER_PY" "${CHECK[@]}"  # a dry run of its own: it prints its commands, makes no CUDA call
[ "$CPU" = 1 ] && exit 0  # the rest measures a GPU
echo "== tiny multi-rank test subset on NCCL ($NGPU rank(s))"
run env GERE_TEST_RANKS=$NGPU "$VENV/bin/python" -m pytest -q -x --timeout 1800 \
    "tests/test_train_dist.py::test_train_entry_point_two_tasks[tm]" \
    tests/test_train_dist.py::test_two_rank_evaluation_equals_one_process
echo "== bf16 throughput probe (plain Hugging Face model and AdamW: the device's ceiling)"
run "$VENV/bin/python" bench/gpu_throughput.py --steps 20
