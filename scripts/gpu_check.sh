#!/bin/bash
# The GPU check (scripts/gpu_check.py): every config under bf16-mixed + torch.compile + channels_last, the benchmark
# suites, the CIFAR-10 fast recipe end to end, and DDP on NCCL with 2+ GPUs; a Markdown report, gpu_check.md.
#   bash scripts/gpu_check.sh [--cifar-dir D] [--out report.md]     (or: make gpu-check)
# About 8 minutes on one GPU. Put the report's numbers in BENCHMARKS.md: they are the only GPU figures we quote.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False). Run this on a GPU machine;" \
         "to try the script on a CPU: $PYTHON scripts/gpu_check.py --accelerator cpu --precision 32-true" \
         "--no-compile --configs mnist/mlp.yaml --skip bench,cifar,ddp" >&2
    exit 2
fi
exec timeout 900 "$PYTHON" scripts/gpu_check.py "$@"
