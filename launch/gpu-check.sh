#!/usr/bin/env bash
# One prepared check of a machine with a GPU, within a budget (default 7 minutes), in this order:
# Triton on CUDA against float64 (it also compiles every kernel variant), `bype bench kernels
# --device cuda` at B=1024, M=50,000, d=40 and at the training shapes, the Triton kernels under the
# previous split rule (BYPE_KERNEL_SPLIT=programs) and, at the training shape, under the split plan instead
# of the one-launch fused plan (BYPE_MIXTURE_PLAN=split), the device time of each Triton kernel
# (torch.profiler, `bype bench kernels --profile`), a ByPE training with the Triton prior against the
# torch prior, `bype bench speed` eager and with train.compile=true, one DDP process over NCCL, the
# kernel test files with compiled Triton. Writes
# OUT/gpu-check.json and OUT/gpu-check.md after every step.
#
#   launch/gpu-check.sh [--dry-run] [--out DIR] [--budget-s SECONDS] [--only STEP,..] [--skip STEP,..]
#
# --dry-run prints the steps and checks the environment (works on a CPU machine).
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels in .whl/ (packages the GPU image
# lacks, e.g. webdataset) are installed into /tmp/bype-site first. Fashion-MNIST is looked for in
# $BYPE_FMNIST_ROOT, /usr/share/datasets/fashion-mnist and .gpudata/fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import webdataset" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bype-site .whl/*.whl
  export PYTHONPATH="/tmp/bype-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # bype and kernels from this checkout
export PYTHONUNBUFFERED=1
exec "$PY" -m bype.bench.gpu_check "$@"
