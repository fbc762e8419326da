#!/usr/bin/env bash
# DeepSpeed's own launcher (dist.engine=deepspeed). One node:
#   launch/deepspeed.sh NPROC [bype train args...]
#   launch/deepspeed.sh 8 --config configs/cifar10/vae-bype.yaml dist.deepspeed_config=configs/deepspeed/zero2-bf16.yaml
# Several nodes: HOSTFILE=hostfile launch/deepspeed.sh NPROC_PER_NODE [args...]  (lines "host slots=8";
# passwordless ssh between nodes, the repository at the same path on each). torchrun works for DeepSpeed
# too: launch/torchrun.sh NPROC dist.engine=deepspeed ...
# On CPU set DS_ACCELERATOR=cpu (ZeRO runs over gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/deepspeed.sh NPROC [bype train args...]}
shift
DEEPSPEED=${DEEPSPEED:-$( [ -x .venv/bin/deepspeed ] && echo .venv/bin/deepspeed || echo deepspeed )}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}  # DeepSpeed's JIT-built ops

extra=()
case " $* " in *" dist.engine="* | *" --resume "* | *" --resume="*) ;; *) extra=(dist.engine=deepspeed) ;; esac
source launch/check.sh
check_config "$DEEPSPEED" "$([ -z "${HOSTFILE:-}" ] && world_of 1 "$NPROC")" "$@" "${extra[@]}"
hosts=()
[ -n "${HOSTFILE:-}" ] && hosts=(--hostfile "$HOSTFILE")
exec "$DEEPSPEED" "${hosts[@]}" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module bype.cli train "$@" "${extra[@]}"
