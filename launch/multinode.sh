#!/usr/bin/env bash
# Several nodes through torchrun's c10d rendezvous. Run the same command on every node, each with its
# NODE_RANK; the run directory (out_dir) must be on a file system all nodes share.
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 launch/multinode.sh [bype train args...]
#   launch/multinode.sh --master-addr node0 --master-port 29500 --nnodes 2 --node-rank 1 --nproc-per-node 8 -- [args...]
# MASTER_ADDR: a host name or address of node 0 that every node can reach (node 0 hosts the rendezvous).
# NNODES may be a range MIN:MAX for elastic membership. MAX_RESTARTS=N restarts failed workers (default 3);
# a restarted job resumes from last.pt by itself. Under SLURM the defaults come from SLURM_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/multinode.sh [--master-addr H] [--master-port P] [--nnodes N] [--node-rank R] [--nproc-per-node K] [--] [bype train args...]"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --master-addr) MASTER_ADDR=$2; shift 2 ;;
    --master-port) MASTER_PORT=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --nproc-per-node) NPROC_PER_NODE=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) break ;;
  esac
done
: "${MASTER_ADDR:?MASTER_ADDR (or --master-addr) must name node 0; $usage}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-bype}}  # identical on every node of one job
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}

# A fresh rendezvous store per restart: the shared one keeps the dead workers' addresses, which a
# restarted process group can read instead of the new ones (gloo: connection refused).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
extra=()
case " $* " in *" dist.engine="* | *" --resume "* | *" --resume="*) ;; *) extra=(dist.engine=ddp) ;; esac
# Node 0 hosts the rendezvous store; saying so beats torchrun's host-name matching (aliases, several NICs).
is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)
source launch/check.sh
check_config "$TORCHRUN" "$(world_of "$NNODES" "$NPROC_PER_NODE")" "$@" "${extra[@]}"  # on every node: each would start workers
exec "$TORCHRUN" --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  --rdzv-conf "is_host=$is_host" --max-restarts "${MAX_RESTARTS:-3}" \
  -m bype.cli train "$@" "${extra[@]}"
