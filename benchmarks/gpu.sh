#!/usr/bin/env bash
# Every GPU check in one call, most important first (device time is scarce; each step's results are written as it
# finishes, so a call cut short still returns them):
#   1. the CUDA-only tests (tests/test_engine_cuda.py: CUDA-graph steps against eager ones)
#   2. issue 8: engine (CUDA graphs, eager) vs the textbook pipeline, and a 50k CIFAR-format scan end to end,
#      with CUDA graphs (the default) and without
#   3. detection unchanged: benchmarks/detection.py at 20k on a few attacks, CUDA graphs on and off
#   4. torch.compile on the GPU, compile time included
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu.sh OUTDIR
set -u
out=${1:-/tmp/qtclean-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tail -15 | tee "$out/tests.txt"
timeout 120 python3 benchmarks/speed.py engine --n 50000 --epochs 2 --format cifar --device cuda | tee "$out/engine.jsonl"
for extra in "" "--no-cuda-graphs"; do
  timeout 150 python3 benchmarks/speed.py scan --n 50000 --format cifar --device cuda -- $extra | tee -a "$out/scan50k.jsonl"
done
for extra in "" "--no-cuda-graphs"; do
  timeout 200 python3 benchmarks/detection.py --n 20000 --attacks badnets,wanet,issba,none --device cuda \
    --results "$out/det" $extra 2>&1 | grep -v "^|" | tee -a "$out/detection.txt"
done
timeout 150 python3 benchmarks/speed.py compile --n 50000 --epochs 4 --device cuda | tee "$out/compile.jsonl"
