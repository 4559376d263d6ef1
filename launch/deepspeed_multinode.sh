#!/usr/bin/env bash
# Multi-node alignment training with the DeepSpeed launcher (pdsh/ssh to every host of the hostfile).
#   launch/deepspeed_multinode.sh HOSTFILE CONFIG [extra `dsalign train align` arguments...]
# Env: NUM_GPUS (processes per node, default: the hostfile's slots), MASTER_PORT (default 29500).
# On CPU-only nodes DeepSpeed cannot count GPUs: set NUM_GPUS (it becomes --num_gpus) and use a *_cpu.json
# DeepSpeed config (gloo).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE CONFIG [--resume] [--set section.key=value ...]" >&2
  exit 2
fi
HOSTFILE=$1; CONFIG=$2; shift 2
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [ -n "${NUM_GPUS:-}" ]; then ARGS+=(--num_gpus "$NUM_GPUS"); fi
# --no_local_rank: ranks come from the environment; the launcher would otherwise put --local_rank=N
# before the subcommand, where the dsalign parser does not accept it.
exec deepspeed "${ARGS[@]}" --module dsalign.cli train align --config "$CONFIG" "$@"
