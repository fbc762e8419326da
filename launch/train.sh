#!/usr/bin/env bash
# The main job: set up a fresh machine (see bootstrap.sh), then `bype train` with any arguments
# (none: ByPE-VAE on real Fashion-MNIST with the built-in short budget).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/bootstrap.sh
exec .venv/bin/bype train "$@"
