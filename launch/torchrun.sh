#!/usr/bin/env bash
# One node, NPROC processes (torchrun, DDP by default):
#   launch/torchrun.sh NPROC [bype train args...]
#   launch/torchrun.sh 2 --config configs/fashion-mnist/vae-bype.yaml name=fm-ddp
#   launch/torchrun.sh 4 dist.engine=deepspeed dist.deepspeed_config=configs/deepspeed/zero2.yaml
#   launch/torchrun.sh 2 --resume runs/fm-ddp
# NPROC may be `gpu` (one process per GPU). train.batch_size is the global batch.
# MAX_RESTARTS=N restarts failed workers up to N times; a restarted job resumes from last.pt by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC [bype train args...]}
shift
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}

# DDP unless the arguments pick an engine; a resumed run keeps the engine in its saved config.
# A fresh rendezvous store per restart: the shared one keeps the dead workers' addresses, which a
# restarted process group can read instead of the new ones (gloo: connection refused).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
extra=()
case " $* " in *" dist.engine="* | *" --resume "* | *" --resume="*) ;; *) extra=(dist.engine=ddp) ;; esac
# Share the CPU cores between the processes (torch would give each of them all the cores).
if [[ "$NPROC" =~ ^[0-9]+$ && -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
fi
source launch/check.sh
check_config "$TORCHRUN" "$(world_of 1 "$NPROC")" "$@" "${extra[@]}"
exec "$TORCHRUN" --standalone --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" \
  -m bype.cli train "$@" "${extra[@]}"
