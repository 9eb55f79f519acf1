#!/usr/bin/env bash
# GPU checks of issue 8, second round: end-to-end scan time vs N (CIFAR format, 32x32 RGB, 10 % BadNets, default
# settings: CUDA-graph steps, early stop), then issue 6's default table (benchmarks/detection.py, 20k) on the GPU.
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu_scaling.sh OUTDIR
set -u
out=${1:-/tmp/qtclean-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for n in 10000 20000 40000 60000; do
  timeout 100 python3 benchmarks/speed.py scan --n $n --format cifar --device cuda | tee -a "$out/scaling.jsonl"
done
python3 benchmarks/detection.py --n 20000 --device cuda --results /tmp/qtclean-det 2>&1 | tee "$out/detection.txt"
