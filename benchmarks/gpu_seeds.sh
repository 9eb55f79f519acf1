#!/usr/bin/env bash
# Issue 6 on a GPU: the default 18-cell table (benchmarks/detection.py, 20k) over several scan seeds, so that a rule
# is judged by how many runs meet the goal rather than by one draw of the training noise. About 100 s a table on
# an H100 or H200 (the learned triggers' networks are trained again for each run); four seeds fit one 10-minute call.
# A GPU run is not repeatable (cuDNN autotuning): keep the scores of the run you report (results.tgz).
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu_seeds.sh OUTDIR [SEEDS]
#   extra detection.py arguments go in $DETECTION_ARGS, e.g. DETECTION_ARGS="--variants default,paper"
set -u
out=${1:-/tmp/qtclean-gpu}
seeds=${2:-0,1,2,3}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for s in ${seeds//,/ }; do
  # shellcheck disable=SC2086  # DETECTION_ARGS is a list of words
  python3 benchmarks/detection.py --n 20000 --device cuda --seed "$s" --results /tmp/qtclean-det --save-scores \
    ${DETECTION_ARGS:-} 2>&1 | tee "$out/seed$s.txt"
  tar czf "$out/results.tgz" -C /tmp qtclean-det  # each cell's result and scores (flag_content.py replays them)
done
