#!/usr/bin/env bash
# Train any preset on this machine through the deepspeed launcher: one process per GPU, or N CPU processes (gloo).
#
#   launch/single_node.sh [key=value ...]
#   CONFIG=launch/presets/llama2-7b-32k.yaml launch/single_node.sh model.path=/models/Llama-2-7b-hf
#   NPROC=2 CONFIG=launch/presets/tiny-cpu.yaml launch/single_node.sh train.max_steps=20
#
# Environment:
#   CONFIG       run preset (default launch/presets/tiny-cpu.yaml); key=value arguments override its keys
#   NPROC        processes (default: every visible GPU; 2 CPU processes on a machine without GPUs)
#   MASTER_PORT  rendezvous port on 127.0.0.1 (default 29500)
#
# Stopping and resuming: SIGTERM or SIGUSR1 to this script (kill -USR1 <pid>) reaches every rank; they finish the
# current step, write a checkpoint and the script exits with 75. Running the same command again resumes from the
# newest complete checkpoint (train.resume=auto is the default). Any other non-zero status is a failure.
#
# Several machines without SLURM: list them in a hostfile (see launch/hostfile.example), make the repository, the
# data and train.output_dir visible at the same path on all of them (passwordless ssh from the first), then run
#   deepspeed --hostfile launch/hostfile --master_addr <first host> --module longctx.cli train --config ...
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=${CONFIG:-$ROOT/launch/presets/tiny-cpu.yaml}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=$(command -v deepspeed || echo "$ROOT/.venv/bin/deepspeed")
die() { echo "single_node.sh: $*" >&2; exit 2; }
[ -x "$DEEPSPEED" ] || die "no deepspeed launcher on PATH or in $ROOT/.venv: run make install"
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG does not exist: give a preset from launch/presets/"

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC=${NPROC:-$([ "${GPUS:-0}" -gt 0 ] && echo "$GPUS" || echo 2)}
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC is not a positive number: set e.g. NPROC=2"
if [ "${GPUS:-0}" -gt 0 ] && [ "$NPROC" -gt "$GPUS" ]; then
  die "NPROC=$NPROC but this machine has $GPUS GPU(s): set NPROC=$GPUS or fewer"
fi
echo "single_node.sh: $NPROC process(es) on $(hostname) (${GPUS:-0} GPU(s)), config $CONFIG, overrides: ${*:-none}"

# The launcher does not pass SIGUSR1 on (and turns SIGTERM into a kill): signal the ranks themselves, which are
# the leaves of the launcher's process tree.
forward_to_ranks() {
  local pids=("$LAUNCHER") leaves=() pid children
  while [ ${#pids[@]} -gt 0 ]; do
    pid=${pids[0]}; pids=("${pids[@]:1}")
    children=$(pgrep -P "$pid" || true)
    if [ -n "$children" ]; then pids+=($children); elif [ "$pid" != "$LAUNCHER" ]; then leaves+=("$pid"); fi
  done
  echo "single_node.sh: signal received, asking ranks ${leaves[*]:-none} to checkpoint and stop" >&2
  [ ${#leaves[@]} -gt 0 ] && kill -USR1 "${leaves[@]}" 2>/dev/null || true
}
trap forward_to_ranks TERM USR1

"$DEEPSPEED" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module longctx.cli train --config "$CONFIG" "$@" &
LAUNCHER=$!
# wait returns early when a trapped signal arrives: keep waiting for the launcher's own exit status.
status=0
while true; do
  wait "$LAUNCHER" && status=0 || status=$?
  kill -0 "$LAUNCHER" 2>/dev/null || break
done
[ "$status" = 75 ] && echo "single_node.sh: preempted after a complete checkpoint; run the same command to resume" >&2
exit "$status"
