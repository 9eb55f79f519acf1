#!/usr/bin/env bash
# Every GPU check in one call, most important first (device time is scarce; each step's results are written as it
# finishes, so a call cut short still returns them):
#   1. issue 8: engine vs textbook pipeline and a 50k CIFAR-format scan end to end (--device cuda)
#   2. per-sample loss dynamics of slow triggers (benchmarks/loss_dynamics.py), for offline analysis
#   3. issues 4/6: benchmarks/detection.py at 20k: QT defaults, the baselines, then the paper's variant
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu.sh OUTDIR
set -u
out=${1:-/tmp/qtclean-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/speed.py engine --n 50000 --epochs 2 --format cifar --device cuda | tee "$out/engine.jsonl"
python3 benchmarks/speed.py scan --n 50000 --format cifar --device cuda | tee "$out/scan50k.jsonl"
python3 benchmarks/loss_dynamics.py --out "$out/dynamics" --device cuda \
  --attacks badnets,blend-noise,blend-image,sig,badnets-a2a,badnets-cl,badnets@0.005,none 2>&1 | tee "$out/dynamics.txt"
for methods in qt loss,ss,ac; do
  python3 benchmarks/detection.py --n 20000 --methods $methods --device cuda --results "$out/det" 2>&1 \
    | tee "$out/detection-${methods//,/-}.txt"
done
python3 benchmarks/detection.py --n 20000 --variants paper --device cuda --results "$out/det" 2>&1 | tee "$out/paper.txt"
