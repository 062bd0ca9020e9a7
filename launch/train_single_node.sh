#!/usr/bin/env bash
# Single-node `slm train` (or `slm score-reference`, as the first argument): torchrun --standalone with one
# process per GPU, the same environment variables as launch/slurm_train.sbatch (see launch/common.sh), no Slurm
# needed.
#
#   CONFIG=launch/configs/tinyllama1b_owm_slm_k0.6.yaml SAVE_DIR=runs/rho1-1b GPUS_PER_NODE=8 \
#     EXTRA_ARGS="--data-path data/owm_llama --ref-load ckpt/tinyllama-math-ref" launch/train_single_node.sh
#
#   CONFIG, SAVE_DIR, EXTRA_ARGS, REPO_DIR, VENV / PYTHON, ENV_SETUP: as in launch/common.sh;
#   arguments to this script (after score-reference, if given) are appended to the command's flags.
#   GPUS_PER_NODE   processes (default: the GPUs nvidia-smi lists, else 1)
#   LOG_DIR         per-run logs (default logs/single-node-<date-time>/): launch.txt, per-rank logs
#
# Stop cleanly with a checkpoint: `kill -USR1 <pid of this script>` (or -TERM); rerunning the same command
# resumes from the latest checkpoint in SAVE_DIR (scoring: from its score parts). Ctrl-C stops at once, without a
# checkpoint.
set -uo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=launch/common.sh
source "$REPO_DIR/launch/common.sh"

slm_setup "$@"
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
    [ "$GPUS_PER_NODE" -ge 1 ] 2> /dev/null || GPUS_PER_NODE=1
fi
LOG_DIR=${LOG_DIR:-logs/single-node-$(date +%Y%m%d-%H%M%S)}
case "$LOG_DIR" in /*) ;; *) LOG_DIR=$PWD/$LOG_DIR ;; esac
slm_omp_threads "$(nproc)" "$GPUS_PER_NODE"
export NNODES=1 NODE_RANK=0 STANDALONE=1 GPUS_PER_NODE LOG_DIR PYTHON
mkdir -p "$LOG_DIR"
slm_record "$LOG_DIR/launch.txt"
slm_log "slm $SLM_COMMAND, $GPUS_PER_NODE process(es); config $CONFIG; checkpoints ${SAVE_DIR:-(none: no --save)}; logs $LOG_DIR"
exec "$REPO_DIR/launch/torchrun_node.sh" -m megatron_slm.cli "$SLM_COMMAND" "${SLM_ARGS[@]}"
