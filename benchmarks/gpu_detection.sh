#!/usr/bin/env bash
# Detection sweeps on the GPU machine (device time is scarce; one call): the patch cells of issue 3 at 10k and
# 20k for the given variants, then every lab attack at 20k (issue 6) for the first variant.
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu_detection.sh OUTDIR VARIANTS
set -u
out=${1:-/tmp/qtclean-gpu}
variants=${2:-default}
first=${variants%%,*}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for n in 10000 20000; do
  python3 benchmarks/detection.py --n $n --attacks badnets,checker,none --rates 0.1,0.05 --variants "$variants" \
    --device cuda --results "$out/det" 2>&1 | tee "$out/patch-$n.txt"
done
python3 benchmarks/detection.py --n 20000 --variants "$first" --device cuda --results "$out/det" 2>&1 | tee "$out/lab.txt"
