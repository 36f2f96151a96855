#!/usr/bin/env bash
# The scratch-regime evidence grid exactly as committed in benchmarks/results/itrd_grid_scratch.*
# (issue 13): 15 student runs of about an hour each on a 2-core CPU, resumable (the same command
# continues it; finished runs are kept in benchmarks/results/itrd_grid_scratch_runs/).
#
#   bash benchmarks/itrd_grid_scratch.sh [--parallel N] [--report-only] [--remeasure-cost] [...]
#
# Extra arguments go to benchmarks/itrd_grid.py. The step-cost column is measured only without
# --no-cost; this script passes --no-cost unless you give --with-cost (measure it on a quiet machine).
# Two 1-thread workers were the fastest setting on the 2-core dev VM:
#   OMP_NUM_THREADS=2 bash benchmarks/itrd_grid_scratch.sh --parallel 2
# To pause it while something else is timed: kill -STOP -<its process group>; -CONT to go on;
# kill -TERM -<group> saves every worker's progress and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
COST=(--no-cost)
ARGS=()
for a in "$@"; do
  if [ "$a" = --with-cost ]; then COST=(); else ARGS+=("$a"); fi
done
exec "$PY" benchmarks/itrd_grid.py --regime scratch --dataset fashion_mnist --seeds 0 1 2 \
  --teacher-epochs 15 --stage-epochs 10 --limit-train 20000 --val-size 5000 --batch-size 256 \
  --rows ce kd itrd itrd_kd itrd_single "${COST[@]}" --runs runs/grid_scratch \
  --out benchmarks/results/itrd_grid_scratch ${ARGS[@]+"${ARGS[@]}"}
