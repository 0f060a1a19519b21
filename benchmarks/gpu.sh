#!/usr/bin/env bash
# Issue 15's GPU measurements in one run, each step under its own time limit, the most needed first:
#   1. the CUDA path's exactness: metaplast.bench in float64 against the literal baseline (bio, pool);
#   2. a smoke run of the Fig. 4 protocol (2 trials x 2 episodes) through Lightning on the GPU;
#   3. the bench, eager, at 20 trials, recomputation 0 and the default (on the first H100 run,
#      2026-11-27, 1-trial rows took 1.5-1.9 s per episode and crowded out the rest);
#   4. the Fig. 4 protocol itself (+experiment=fig4: the 10-term pool, 20 trials x 600 episodes),
#      eager, then with trainer.compile=true, each cut at PROTOCOL_LIMIT_S, its progress sampled
#      every 10 s so a run cut off by its limit still gives episodes per second;
#   5. the bench with trainer.compile (torch.compile of the step) at 20 trials.
# Steps 1-2 failing stops the script (the later steps would fail the same way).
#
#   bash benchmarks/gpu.sh OUT_DIR [IDX_DATA_ROOT] [PROTOCOL_LIMIT_S]
#
# IDX_DATA_ROOT holds FashionMNIST's IDX files (default: Debian's dataset-fashion-mnist), the
# stand-in for EMNIST where that cannot be downloaded; the protocol's cost does not depend on the
# images. OUT_DIR receives at most 8 files (logs and progress); the summary is printed last.
# DEVICE=cpu dry-runs the script on a machine without a GPU.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [IDX_DATA_ROOT] [PROTOCOL_LIMIT_S]}
data=${2:-/usr/share/datasets/fashion-mnist}
protocol_limit=${3:-150}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
accelerator=$([ "$device" = cpu ] && echo cpu || echo gpu)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 WANDB_MODE=offline
summary=$(mktemp)

step() { # NAME LIMIT_S COMMAND...: run with a limit, log to OUT_DIR/NAME.log, note rc and seconds
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s, $(date -u +%T) UTC): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $((SECONDS - start)) s" | tee -a "$summary"
    return $rc
}

protocol() { # NAME OVERRIDES...: the Fig. 4 protocol with its progress (seconds, metrics.csv rows)
    local name=$1 run_dir=/tmp/metaplast-$1
    shift
    rm -rf "$run_dir"
    (
        start=$SECONDS
        while sleep 10; do
            echo "$((SECONDS - start)) $(($(wc -l <"$run_dir/metrics.csv" 2>/dev/null || echo 1) - 1))"
        done
    ) >"$out/$name-progress.txt" 2>/dev/null &
    local sampler=$!
    step "$name" "$protocol_limit" "${train[@]}" "hydra.run.dir=$run_dir" "$@"
    kill $sampler
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$py" -c "import torch, lightning, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), 'lightning', lightning.__version__, 'hydra', hydra.__version__)"
    nproc --all
} 2>&1 # printed only: OUT_DIR holds 8 files at most

bench=("$py" -m metaplast.bench --device "$device" --verbose --no-memory)
step exact 90 "${bench[@]}" --rule bio pool --trials 2 --steps 60 --dtype float64 --recompute 0 8 \
    --repeats 1 --tolerance 1e-9 || { tail -40 "$out/exact.log"; exit 1; }
train=("$py" -m metaplast.train +experiment=fig4 dataset=idx "dataset.root=$data"
    "trainer.accelerator=$accelerator" logger.wandb=false trainer.progress_bar=false verbose=true)
step smoke 90 "${train[@]}" meta.trials=2 meta.episodes=2 hydra.run.dir=/tmp/metaplast-smoke ||
    { tail -40 "$out/smoke.log"; exit 1; }

step bench 120 "${bench[@]}" --rule pool bio --trials 20 --recompute 0 8 --compile 0 --repeats 2
protocol fig4
protocol fig4-compiled trainer.compile=true
step compiled 110 "${bench[@]}" --rule pool bio --trials 20 --recompute 8 --compile 1 --repeats 2

echo
echo "== summary"
for name in exact bench compiled; do
    echo "-- $name"
    grep -E "^(rule|bio|pool|machine) |error" "$out/$name.log" | head -40
done
for name in fig4 fig4-compiled; do
    echo "-- $name (seconds, rows = trials x episodes done)"
    tail -n 4 "$out/$name-progress.txt"
    tail -n 2 "$out/$name.log"
done
cat "$summary"
