#!/usr/bin/env bash
# One node's share of a run (slm train or slm score-reference): torchrun for this node's GPUs, plus the
# stop-signal forwarding.
#
# Started once per node by launch/slurm_train.sbatch (as the srun task) and by launch/train_single_node.sh;
# the launchers set its environment:
#   PYTHON          the Python that runs torchrun and the workers
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank (default $SLURM_NODEID, else 0)
#   GPUS_PER_NODE   worker processes on this node (default 1)
#   MASTER_ADDR, MASTER_PORT   static rendezvous on node 0 (multi-node; port default 29500)
#   STANDALONE=1    single node: torchrun --standalone instead of MASTER_ADDR/PORT
#   LOG_DIR         if set: torchrun also writes each rank's stdout/stderr under $LOG_DIR/node<NODE_RANK>/
# Arguments: the worker command as torchrun takes it, e.g. -m megatron_slm.cli train --config run.yaml ...
# (score-reference stops the same way: after its step, keeping its score parts, exit 0).
#
# Signals. SIGUSR1 or SIGTERM to this script = "checkpoint and stop": it sends SIGUSR1 to every worker (the
# children of torchrun); the trainer finishes its step, all ranks save a checkpoint and exit 0, torchrun
# exits 0, and so does this script. Why here and not in torchrun (torch 2.13,
# torch/distributed/elastic/multiprocessing/api.py and launcher/api.py):
#   - torchrun installs handlers only for --signals-to-handle, default SIGTERM,SIGINT,SIGHUP,SIGQUIT (it
#     overwrites TORCHELASTIC_SIGNALS_TO_HANDLE from that flag). A SIGUSR1 reaching torchrun kills it
#     (default action) and orphans its workers.
#   - With SIGUSR1 in --signals-to-handle, torchrun does forward it, but then raises SignalException: it
#     exits 1 with a traceback and SIGKILLs workers still running after --shutdown-timeout. A clean
#     checkpoint-and-stop would look like a crash, and srun --kill-on-bad-exit could kill the other nodes
#     while their ranks are still finishing.
# So torchrun runs with SIGUSR1 ignored (SIG_IGN is inherited across exec, so its workers also ignore it until
# the trainer installs its handler: a signal that comes while a worker is still starting is not fatal), and
# this script signals the workers itself: each worker once, as soon as /proc shows it catching SIGUSR1 (the
# trainer's handler). Not before (it would be ignored) and not twice (Python resets its handlers to the default
# action while the interpreter exits, when a second SIGUSR1 would kill a worker that already checkpointed).
# SIGINT (Ctrl-C) is left to torchrun: it stops the workers at once, without a checkpoint.
set -uo pipefail

node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
nnodes=${NNODES:-1}
nproc=${GPUS_PER_NODE:-1}
: "${PYTHON:?set PYTHON (the launchers do)}"

log() { printf '[launch node %s %s] %s\n' "$node_rank" "$(date '+%T')" "$*" >&2; }

launcher=("$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc")
if [ "${STANDALONE:-0}" = 1 ]; then
    launcher+=(--standalone)
else
    : "${MASTER_ADDR:?set MASTER_ADDR (the host of node 0)}"
    launcher+=(--node-rank "$node_rank" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}"
        --rdzv-id "${SLURM_JOB_ID:-none}")
fi
if [ -n "${LOG_DIR:-}" ]; then
    mkdir -p "$LOG_DIR/node$node_rank"
    launcher+=(--log-dir "$LOG_DIR/node$node_rank" --tee 3)
fi

stop_signal=""
torchrun_pid=""
signalled=" "
usr1_bit=$((1 << ($(kill -l USR1) - 1))) # in the signal masks of /proc/<pid>/status

# Send SIGUSR1 to each worker (child of torchrun) that catches it and has not had it yet.
forward_stop() {
    [ -n "$torchrun_pid" ] || return 0
    local pid key value caught
    for pid in $(pgrep -P "$torchrun_pid"); do
        case "$signalled" in *" $pid "*) continue ;; esac
        caught=0
        while read -r key value; do
            if [ "$key" = SigCgt: ]; then
                caught=$((0x$value & usr1_bit))
            fi
        done < "/proc/$pid/status"
        if [ "$caught" != 0 ] && kill -USR1 "$pid" 2> /dev/null; then
            signalled+="$pid "
        fi
    done 2> /dev/null # a worker that exits meanwhile
}

# shellcheck disable=SC2317  # called from the traps below
on_signal() {
    if [ -z "$stop_signal" ]; then
        stop_signal=$1
        log "got SIG$1: asking the workers to save their progress and stop (SIGUSR1)"
    fi
    forward_stop
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

(
    trap '' USR1
    exec "${launcher[@]}" "$@"
) &
torchrun_pid=$!
if [ -n "$stop_signal" ]; then
    forward_stop
fi

# `wait` returns early when a trapped signal arrives, so poll instead of a single wait.
while kill -0 "$torchrun_pid" 2> /dev/null; do
    if [ -n "$stop_signal" ]; then
        forward_stop
    fi
    sleep 1 &
    wait $!
done
wait "$torchrun_pid"
rc=$?
if [ -n "$stop_signal" ]; then
    log "the workers stopped after SIG$stop_signal (torchrun exit status $rc)"
fi
exit "$rc"
