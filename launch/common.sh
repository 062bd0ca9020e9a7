# shellcheck shell=bash
# Shared by launch/slurm_train.sbatch and launch/train_single_node.sh (sourced, never run on its own).
#
# Both launchers run `slm train`, or `slm score-reference` when their first argument is score-reference (the
# reference's offline scoring: it stops, requeues and resumes as training does, from its score parts).
#
# The environment-variable interface of both launchers (each documents the variables it adds):
#   CONFIG         YAML config of the run (required), e.g. launch/configs/mistral7b_owm_slm_k0.7.yaml
#   SAVE_DIR       checkpoint directory, passed as --save (required by the Slurm script: resume and requeue
#                  rely on it; optional for the single-node script). A rerun resumes from its latest checkpoint.
#                  Training only: scoring keeps its progress in <first sidecar>.parts (--ref-scores-path).
#   EXTRA_ARGS     more flags of the command, split on whitespace, e.g. "--data-path 0.7 data/owm 0.3 data/gen".
#                  Arguments given to the launcher itself are appended after them (use those for paths
#                  with spaces).
#   REPO_DIR       the megatron_slm checkout (default: the submit directory / the script's parent)
#   VENV, PYTHON   the Python to run (default: $REPO_DIR/.venv/bin/python)
#   ENV_SETUP      a file sourced before anything runs (module loads, conda activate, cluster NCCL settings)
#   GPUS_PER_NODE  training processes per node
#   LOG_DIR        per-run log directory: the launch record and torchrun's per-rank stdout/stderr
#   OMP_NUM_THREADS (default: CPUs per node / GPUS_PER_NODE), NCCL_* and TORCH_* variables: passed through.

slm_log() { printf '[launch %s] %s\n' "$(date '+%F %T')" "$*" >&2; }

slm_die() {
    slm_log "error: $*"
    exit 2
}

# slm_setup [train | score-reference] [flags...]: check the inputs, set PYTHON, SLM_COMMAND (default train) and
# the array SLM_ARGS (the command's flags), export the runtime env.
slm_setup() {
    SLM_COMMAND=train
    case "${1:-}" in
    train | score-reference)
        SLM_COMMAND=$1
        shift
        ;;
    esac
    [ -f "$REPO_DIR/megatron_slm/cli.py" ] ||
        slm_die "REPO_DIR=$REPO_DIR is not a megatron_slm checkout; submit from the repository root or set REPO_DIR"
    if [ -n "${ENV_SETUP:-}" ]; then
        [ -f "$ENV_SETUP" ] || slm_die "ENV_SETUP=$ENV_SETUP does not exist"
        # shellcheck disable=SC1090  # a user-provided file
        source "$ENV_SETUP"
    fi
    VENV=${VENV:-$REPO_DIR/.venv}
    PYTHON=${PYTHON:-$VENV/bin/python}
    [ -x "$PYTHON" ] || command -v "$PYTHON" > /dev/null 2>&1 ||
        slm_die "no Python at PYTHON=$PYTHON; run tools/setup.sh in $REPO_DIR or set VENV / PYTHON"
    [ -n "${CONFIG:-}" ] || slm_die "set CONFIG=path/to/run.yaml (examples in launch/configs/)"
    [ -f "$CONFIG" ] || slm_die "CONFIG=$CONFIG does not exist"
    case "$CONFIG" in /*) ;; *) CONFIG=$PWD/$CONFIG ;; esac
    SLM_ARGS=(--config "$CONFIG")
    if [ -n "${SAVE_DIR:-}" ]; then
        [ "$SLM_COMMAND" = train ] || slm_die "SAVE_DIR is for slm train; score-reference keeps its progress in" \
            "<first sidecar>.parts and resumes from there: unset SAVE_DIR"
        case "$SAVE_DIR" in /*) ;; *) SAVE_DIR=$PWD/$SAVE_DIR ;; esac
        SLM_ARGS+=(--save "$SAVE_DIR")
    fi
    local extra=()
    if [ -n "${EXTRA_ARGS:-}" ]; then
        read -r -a extra <<< "$EXTRA_ARGS"
        SLM_ARGS+=("${extra[@]}")
    fi
    if [ "$#" -gt 0 ]; then
        SLM_ARGS+=("$@")
    fi
    # The package is importable from the checkout even with a Python it is not installed in.
    export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    # megatron-core: one CUDA work queue, so TP communication is issued in program order.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # A failed or hung NCCL collective aborts the process (and so the run) instead of hanging it.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # How long torchrun waits for its workers after forwarding SIGTERM/SIGINT before SIGKILL (its default is
    # 30 s, shorter than writing a 7B checkpoint).
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
}

# slm_omp_threads CPUS_PER_NODE PROCS_PER_NODE: export OMP_NUM_THREADS unless set (at least 1).
slm_omp_threads() {
    local threads=$(($1 / $2))
    [ "$threads" -ge 1 ] || threads=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
}

# slm_record FILE: what was launched, for the per-run log directory.
slm_record() {
    {
        echo "date: $(date '+%F %T %z')"
        echo "host: $(hostname)"
        echo "repo: $REPO_DIR ($(git -C "$REPO_DIR" describe --always --dirty 2> /dev/null || echo 'no git'))"
        echo "python: $PYTHON"
        printf 'command: %q' "$PYTHON"
        printf ' %q' -m megatron_slm.cli "$SLM_COMMAND" "${SLM_ARGS[@]}"
        echo
        env | grep -E '^(SLURM_JOB_ID|SLURM_JOB_NAME|SLURM_NNODES|SLURM_JOB_NODELIST|SLURM_RESTART_COUNT|MASTER_ADDR|MASTER_PORT|GPUS_PER_NODE|NNODES|OMP_NUM_THREADS|CUDA_|NCCL_|TORCH_)' | sort
    } > "$1"
}

# slm_run_state SINCE_EPOCH: how the last run of $SLM_COMMAND ended after SINCE_EPOCH: "finished", "stopped"
# (stopped on a signal or --exit-duration-in-mins, its progress kept) or "unknown".
slm_run_state() {
    if [ "$SLM_COMMAND" = score-reference ]; then
        slm_scoring_state "$1"
    else
        slm_training_state "$1"
    fi
}

# slm_scoring_state SINCE_EPOCH: from the sidecars and the stop record of `slm score-reference "${SLM_ARGS[@]}"`
# (megatron_slm.scoring.run_state, after the command's own flag parsing). Its stderr is dropped: flags that do
# not parse were already reported by the run itself, and the state is then "unknown".
slm_scoring_state() {
    "$PYTHON" - "$1" "${SLM_ARGS[@]}" 2> /dev/null << 'EOF' || echo unknown
import sys

from megatron_slm.cli import build_parser
from megatron_slm.config import load_config
from megatron_slm.scoring import run_state

args = build_parser().parse_args(["score-reference", *sys.argv[2:]])
print(run_state(load_config(args.config, args=args), float(sys.argv[1])))
EOF
}

# slm_training_state SINCE_EPOCH: how the last run in $SAVE_DIR ended, from the summary.json it wrote after
# SINCE_EPOCH: "finished", "stopped" (checkpointed and stopped on a signal) or "unknown".
slm_training_state() {
    if [ -z "${SAVE_DIR:-}" ]; then
        echo unknown
        return
    fi
    "$PYTHON" - "$SAVE_DIR/summary.json" "$1" << 'EOF'
import json, os, sys

path, since = sys.argv[1], float(sys.argv[2])
try:
    if os.path.getmtime(path) < since:
        raise FileNotFoundError(path)
    with open(path) as f:
        summary = json.load(f)
    # null: the run started at its last iteration and had nothing left to do
    print("stopped" if summary and summary.get("stopped_by") else "finished")
except (OSError, ValueError):
    print("unknown")
EOF
}
