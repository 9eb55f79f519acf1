#!/usr/bin/env bash
# Issue 6 on a GPU: the default 18-cell table (benchmarks/detection.py, 20k) over several scan seeds, so that a rule
# is judged by how many runs meet the goal rather than by one draw of the training noise. The seeds run side by
# side, two CPU threads each: a 20k scan leaves an H200 mostly idle, so four tables took 377 s together in session
# 25 against 130-145 s each one after the other in session 24. Scan times are then not comparable across sections.
# A GPU run is not repeatable (cuDNN autotuning): keep the scores of the run you report (results.tgz).
# Usage (repo root, Fashion-MNIST IDX files in $QTCLEAN_FMNIST_DIR): bash benchmarks/gpu_seeds.sh OUTDIR [SEEDS]
#   extra detection.py arguments go in $DETECTION_ARGS, e.g. DETECTION_ARGS="--variants default,paper";
#   $LIMIT (seconds, default 500) stops every run still going, so that the packing below runs inside a call's limit.
set -u
out=${1:-/tmp/qtclean-gpu}
seeds=${2:-0,1,2,3}
mkdir -p "$out" /tmp/qtclean-det
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
pids=()
for s in ${seeds//,/ }; do
  # shellcheck disable=SC2086  # DETECTION_ARGS is a list of words
  python3 benchmarks/detection.py --n 20000 --device cuda --seed "$s" --results /tmp/qtclean-det --save-scores \
    ${DETECTION_ARGS:-} > "$out/seed$s.txt" 2>&1 &
  pids+=($!)
done
(sleep "${LIMIT:-500}"; kill "${pids[@]}" 2>/dev/null) &
stopper=$!
wait "${pids[@]}"
kill "$stopper" 2>/dev/null
tar czf "$out/results.tgz" -C /tmp qtclean-det  # each cell's result and scores (readout.py replays them)
grep -h "^| " "$out"/seed*.txt
