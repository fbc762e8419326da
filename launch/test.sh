#!/usr/bin/env bash
# The test command: set up a fresh machine (see bootstrap.sh), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/bootstrap.sh
export DS_ACCELERATOR=cpu                              # DeepSpeed tests run on CPU with gloo
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"  # cache its JIT builds
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q "$@"
