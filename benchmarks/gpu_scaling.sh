#!/usr/bin/env bash
# GPU checks of issue 8, second round: end-to-end scan time vs N (CIFAR format, 32x32 RGB, 10 % BadNets) with
# the default early stop, the 20k patch cells with early stop, and the engine ratio at batch 512.
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu_scaling.sh OUTDIR
set -u
out=${1:-/tmp/qtclean-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for n in 10000 20000 40000 60000; do
  python3 benchmarks/speed.py scan --n $n --format cifar --device cuda | tee -a "$out/scaling.jsonl"
done
python3 benchmarks/patch_detection.py --sizes 20000 --results "$out/patch" -- --device cuda 2>&1 | tee "$out/patch.txt"
python3 benchmarks/speed.py engine --n 50000 --epochs 2 --format cifar --device cuda --batch-size 512 | tee "$out/engine512.jsonl"
