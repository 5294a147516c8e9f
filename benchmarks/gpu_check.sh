#!/usr/bin/env bash
# The GPU check (issue 15), for a machine with an NVIDIA GPU; stops itself after 10 minutes.
# Builds the environment like `make env` if needed, shows the GPU, then runs gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    make env EXTRAS=beam,dev
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 600 .venv/bin/python benchmarks/gpu_check.py "$@"
