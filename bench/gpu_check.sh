#!/usr/bin/env bash
# GPU check of gere-ds on a machine that has only torch (with CUDA) installed and no network.
#
# 1. On a machine with network, from the repository root: gere-ds and every dependency except
#    torch as wheels into one folder (carried to the GPU machine with the repository):
#       bash bench/gpu_check.sh --build-wheels wheels
#    (= pip wheel --no-deps . -w wheels, then pip download --no-deps of every package of this
#    machine's working .venv except torch/triton/nvidia-*, so the GPU machine's CUDA build is
#    kept; build on the same OS, CPU architecture and Python version as the GPU machine)
# 2. On the GPU machine:
#       bash bench/gpu_check.sh --wheels wheels
#    installs from the wheels only (--no-index) into .venv-gpu (system torch visible), runs the
#    tiny multi-rank test subset on NCCL (2 ranks when there are 2 GPUs, else 1), then a short
#    bf16 throughput run, and prints tokens/s, MFU and peak memory.
#   bash bench/gpu_check.sh --dry-run   prints the steps; --cpu runs them on the CPU (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=run WHEELS=wheels CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-wheels) MODE=build; WHEELS="${2:?folder}"; shift 2 ;;
    --wheels) WHEELS="${2:?folder}"; shift 2 ;;
    --dry-run) MODE=dry; shift ;;
    --cpu) CPU=1; shift ;;
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
  $PY -m pip download -q --no-deps -r "$WHEELS/requirements.txt" -d "$WHEELS"
  echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files (torch not included)"
  exit 0
fi

if [ "$CPU" = 1 ]; then
  ACC=cpu NGPU=2
else
  run $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
  ACC=cuda
  NGPU=$($PY -c "import torch; print(min(2, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
VENV=.venv-gpu
if [ "$CPU" = 1 ] && [ -x .venv/bin/python ]; then VENV=.venv; fi
if [ ! -x "$VENV/bin/python" ]; then
  run $PY -m venv --system-site-packages "$VENV"
  run "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "gere-ds[test]" \
      -c constraints.txt
fi
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false GERE_TEST_ACCELERATOR=$ACC
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
echo "== tiny multi-rank subset on $ACC ($([ "$ACC" = cuda ] && echo NCCL || echo gloo), $NGPU rank(s))"
run env GERE_TEST_RANKS=$NGPU "$VENV/bin/python" -m pytest -q -x --timeout 1800 \
    "tests/test_train_dist.py::test_train_entry_point_two_tasks[tm]" \
    tests/test_train_dist.py::test_two_rank_evaluation_equals_one_process
echo "== bf16 throughput"
if [ "$CPU" = 1 ]; then
  run "$VENV/bin/python" bench/gpu_throughput.py --cpu
else
  run "$VENV/bin/python" bench/gpu_throughput.py --steps 20
fi
