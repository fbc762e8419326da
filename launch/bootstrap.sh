#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: the Debian data package and a
# virtualenv (.venv) with bype installed in editable mode. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -d "$FMNIST_DIR" ]; then
  echo "[bootstrap] installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "$PY" -m venv .venv
fi
# torch is pinned first: the 2.13.0 CPU wheel is on local disk; an unpinned torch would pull a CUDA build.
# The install is redone whenever pyproject.toml changes (its hash is kept in the venv).
STAMP=.venv/.bype-pyproject.sha256
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! .venv/bin/python -c "import torch, bype" 2>/dev/null; then
  echo "[bootstrap] installing torch and bype[dev]"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0" numpy
  .venv/bin/pip install -q -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi
echo "[bootstrap] ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
