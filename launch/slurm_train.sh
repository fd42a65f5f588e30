#!/bin/bash
# gere-ds on Slurm: one `deepspeed --no_ssh` launcher per node, pre-flight first, re-queue on
# pre-emption. See docs/multinode.md.
#
#   sbatch --nodes=4 launch/slurm_train.sh configs/x.yaml [key=value ...]
#   sbatch --nodes=2 --export=ALL,GERE_ACCELERATOR=cpu,RANKS_PER_NODE=2 \
#       launch/slurm_train.sh configs/x.yaml
#
# The config should say `resume: auto` (the default): a re-queued job runs this same script
# again and the trainer continues from the newest checkpoint that is complete on every rank.
#
# Environment (all optional):
#   GERE_REPO          repository root, the same path on every node (default: submit dir)
#   GERE_VENV          virtual environment with gere-ds installed (default: $GERE_REPO/.venv)
#   GERE_ACCELERATOR   cuda (default) | cpu (gloo over TCP, DS_ACCELERATOR=cpu)
#   RANKS_PER_NODE     ranks per node (default: $SLURM_GPUS_ON_NODE, else 8; cpu: 1)
#   MASTER_PORT        rendezvous port on the first node (default: 20000 + job id % 20000)
#   LOG_DIR            Slurm logs: one per node (default: $GERE_REPO/logs)
#   PREFLIGHT          1 (default) = run the pre-flight check before training; 0 = skip
#   PREFLIGHT_TIMEOUT  seconds for the pre-flight rendezvous and collectives (default 120)
#   NODE_TMP           node-local scratch (default: $SLURM_TMPDIR, $TMPDIR or /tmp)
#   SRUN_ARGS          extra arguments for the srun steps, e.g. "--gpus-per-node=8" where steps
#                      do not see the job's GPUs by default, or "--cpu-bind=none"
#   NCCL_SOCKET_IFNAME / NCCL_IB_HCA / NCCL_IB_DISABLE / GLOO_SOCKET_IFNAME: network interfaces
#
#SBATCH --job-name=gere-ds
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120

set -uo pipefail

# ----------------------------------------------------------------------------- per-node part
# `srun` runs this same file with --node-task on every node (the batch copy of a script lives
# only on the first node, so the repository's copy is used: it must be at the same path).
if [[ "${1:-}" == "--node-task" ]]; then
    shift
    script="$1"; shift
    node_tmp="${NODE_TMP}/gere-${SLURM_JOB_ID}-node${SLURM_NODEID}"
    mkdir -p "$node_tmp"
    # every node writes the same hostfile, node-locally: DeepSpeed takes the world layout
    # (node order, ranks per node) from it; --node_rank picks this node's line
    hostfile="$node_tmp/hostfile"
    scontrol show hostnames "$SLURM_JOB_NODELIST" \
        | awk -v n="$RANKS_PER_NODE" '{print $1 " slots=" n}' > "$hostfile"
    # The pre-emption notice reaches every process of the step as SIGUSR1 (see the batch part).
    # The launchers ignore it (an ignored signal stays ignored across exec) and keep running;
    # the ranks install their own handler, checkpoint at the next step boundary and exit 0,
    # after which the launchers exit 0 too. (Sending SIGTERM to DeepSpeed's launcher instead
    # would kill the ranks after a fixed 30 s and exit 1.)
    trap '' USR1
    cd "$GERE_REPO" || exit 2
    exec "$GERE_VENV/bin/deepspeed" --hostfile "$hostfile" --no_ssh \
        --num_nodes "$SLURM_NNODES" --num_gpus "$RANKS_PER_NODE" \
        --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        "$script" "$@"
fi

# ----------------------------------------------------------------------------- batch part
if [[ $# -lt 1 ]]; then
    echo "usage: sbatch [--nodes=N] launch/slurm_train.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
export GERE_REPO="${GERE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
export GERE_VENV="${GERE_VENV:-$GERE_REPO/.venv}"
export GERE_ACCELERATOR="${GERE_ACCELERATOR:-cuda}"
export NODE_TMP="${NODE_TMP:-${SLURM_TMPDIR:-${TMPDIR:-/tmp}}}"
export LOG_DIR="${LOG_DIR:-$GERE_REPO/logs}"
export MASTER_ADDR
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
if [[ "$GERE_ACCELERATOR" == cpu ]]; then
    export RANKS_PER_NODE="${RANKS_PER_NODE:-1}"
    export DS_ACCELERATOR=cpu                     # gloo over TCP; no NCCL
    # export GLOO_SOCKET_IFNAME=eth0              # the interface the nodes reach each other on
    cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / RANKS_PER_NODE > 0 ? cpus / RANKS_PER_NODE : 1 ))}"
else
    export RANKS_PER_NODE="${RANKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
    # NCCL: name the interface for bootstrap/TCP traffic (e.g. ib0, eth0, ens; "^lo,docker"
    # excludes); on InfiniBand name the HCAs; without InfiniBand set NCCL_IB_DISABLE=1
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
    [[ -n "${NCCL_IB_HCA:-}" ]] && export NCCL_IB_HCA
    [[ -n "${NCCL_IB_DISABLE:-}" ]] && export NCCL_IB_DISABLE
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a dead peer fails the job, not a hang
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
fi
# compiled DeepSpeed ops: node-local (a shared folder sees concurrent builds from every node)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$NODE_TMP/${USER:-gere}/torch_extensions}"
export TOKENIZERS_PARALLELISM=false
mkdir -p "$LOG_DIR"

CONFIG="$1"; shift
SELF="$GERE_REPO/launch/slurm_train.sh"
echo "[$(date '+%F %T')] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES} node(s) x ${RANKS_PER_NODE} rank(s), master ${MASTER_ADDR}:${MASTER_PORT}, accelerator ${GERE_ACCELERATOR}"

# one task per node; each node's launcher output (all its ranks) goes to its own log file;
# a node whose launcher fails ends the step on every node (no half-alive job)
# (the one task gets all the node's CPUs: by default a step task is bound to one CPU, and all
# of the node's ranks would share it)
STEP_ARGS=(--nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
           --output="$LOG_DIR/%x-%j-node%n.log" --open-mode=append)
[[ -n "${SLURM_CPUS_ON_NODE:-}" ]] && STEP_ARGS+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
read -r -a EXTRA_SRUN_ARGS <<< "${SRUN_ARGS:-}"
run_on_nodes() {
    srun "${STEP_ARGS[@]}" "${EXTRA_SRUN_ARGS[@]}" bash "$SELF" --node-task "$@" &
    local step=$! next_notice=0
    while kill -0 "$step" 2>/dev/null; do
        # after a pre-emption notice, repeat it every 10 s: ranks still starting up (their
        # handler not yet installed) ignore it, and must hear it once they are training
        if (( PREEMPTED && SECONDS >= next_notice )); then
            scancel --signal=USR1 "$SLURM_JOB_ID"
            next_notice=$(( SECONDS + 10 ))
        fi
        sleep 1 & wait $!  # a short, interruptible wait (a trapped TERM returns at once)
    done
    wait "$step"
}

PREEMPTED=0
on_preempt() {
    # SIGUSR1 goes to every process of the job's steps, not to this shell (run_on_nodes sends
    # it, and repeats it); see the per-node part for why the launchers survive it
    (( PREEMPTED )) || echo "[$(date '+%F %T')] pre-emption notice: asking every rank to checkpoint and exit"
    PREEMPTED=1
}
trap on_preempt TERM
trap '' USR1  # in case a signal meant for the steps reaches this shell

# 1. launcher-side checks (no process group): node list, master address, port
HOSTFILE="$NODE_TMP/gere-${SLURM_JOB_ID}-hostfile"
scontrol show hostnames "$SLURM_JOB_NODELIST" \
    | awk -v n="$RANKS_PER_NODE" '{print $1 " slots=" n}' > "$HOSTFILE"
"$GERE_VENV/bin/python" -m gere_ds.cli preflight --hostfile "$HOSTFILE" --num_nodes "$SLURM_NNODES" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --timeout 30 || exit 2

# 2. the pre-flight check under the same launchers as training (every rank)
if [[ "${PREFLIGHT:-1}" == 1 && $PREEMPTED == 0 ]]; then
    run_on_nodes launch/preflight.py --config "$CONFIG" "$@" \
        --timeout "${PREFLIGHT_TIMEOUT:-120}"
    rc=$?
    if (( rc != 0 )); then
        echo "[$(date '+%F %T')] pre-flight check failed (exit $rc): see $LOG_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}-node*.log" >&2
        (( PREEMPTED )) && scontrol requeue "$SLURM_JOB_ID"
        exit "$rc"
    fi
fi

# 3. training (rank 0 writes train.log, train_steps.jsonl, TensorBoard and metrics into
#    output_dir; every node's launcher output is in its own log above)
rc=0
if (( PREEMPTED == 0 )); then
    run_on_nodes launch/train.py --config "$CONFIG" "$@"
    rc=$?
fi
if (( PREEMPTED )); then
    # exit 0 (or 143) after a pre-emption checkpoint; anything else still re-queues: resume
    # picks the newest checkpoint complete on every rank
    echo "[$(date '+%F %T')] training stopped for pre-emption (exit $rc); re-queueing ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[$(date '+%F %T')] training finished (exit $rc)"
exit "$rc"
