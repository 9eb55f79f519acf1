#!/usr/bin/env bash
# The GPU checks of issues 3 and 8 in one call (device time is scarce): engine vs textbook pipeline, a 50k
# CIFAR-format scan end to end, and the 20k patch-detection cells, all with --device cuda.
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu.sh OUTDIR
set -u
out=${1:-/tmp/qtclean-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/speed.py engine --n 50000 --epochs 2 --format cifar --device cuda | tee "$out/engine.jsonl"
python3 benchmarks/speed.py scan --n 50000 --format cifar --device cuda | tee "$out/scan50k.jsonl"
python3 benchmarks/patch_detection.py --sizes 20000 --results "$out/patch" -- --device cuda 2>&1 | tee "$out/patch.txt"
