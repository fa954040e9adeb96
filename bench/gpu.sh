#!/usr/bin/env bash
# GPU benchmark of the render service, on a fresh GPU machine, from the repo root:
#   bash bench/gpu.sh [--batches 1 2 4 8 16] [--steps 20] ...   (see python -m bench.gpu --help)
# No model weights are downloaded: bench/gpu.py builds an SD 1.5-shaped model from configs.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -d .venv ] || python3 -m venv .venv
# Unpinned on purpose: on a GPU host plain `pip install torch` gets the CUDA build. The
# Makefile pins torch==2.13.0 because there it must be the CPU build of this dev machine.
.venv/bin/pip install --quiet --disable-pip-version-check torch
.venv/bin/pip install --quiet --disable-pip-version-check -e .
# A .venv made by `make` holds the CPU torch, which pip leaves in place: stop, not bench a CPU.
.venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
    f"torch {torch.__version__} in .venv sees no CUDA GPU: remove .venv and run this again")'

nvidia-smi
exec .venv/bin/python -m bench.gpu "$@"
