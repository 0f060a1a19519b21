#!/usr/bin/env bash
# Issue 4's benchmark: paper architecture 784-170-130-100-70-47, 250 inner steps, feedback=fa,
# rules f0 / bio / pool, 1 and 20 trials, recomputation off (0) and every 16 steps.
# Writes benchmarks/results-<tag>.txt (the table) and .json. Extra arguments go to metaplast.bench,
# e.g.  benchmarks/run.sh --device cuda   (TAG=gpu)   or   THREADS=2 benchmarks/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
tag=${TAG:-cpu}
threads=${THREADS:-1}
OMP_NUM_THREADS=$threads "$python" -m metaplast.bench --rule f0 bio pool --trials 1 20 --recompute 0 8 \
    --threads "$threads" --json "benchmarks/results-$tag.json" "$@" | tee "benchmarks/results-$tag.txt"
