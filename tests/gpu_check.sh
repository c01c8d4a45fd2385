#!/usr/bin/env bash
# Benchmark (not a test): the CUDA checks and GPU figures of one short GPU session, every step capped in time.
#
#     bash tests/gpu_check.sh [checks|boxing] [OUTPUT_FOLDER]      # from the repository root, on a CUDA machine
#
# checks: tests/bench_speed.py for v2, decoder-free, v3, v1, small and tiny with --amp's bf16 autocast (the default)
#   and v2 and decoder-free in float32 (--no-amp); --compile at tiny and small sizes; a 50-second run of the README's
#   command stopped with Ctrl-C; the suite without the learning tests on the GPU.
# boxing (not measured yet whether it fits): tests/bench_learning.py on Boxing at its 40,000-step budget, each of
#   PRESETS (default: v2 decoder-free v3) on seeds 1-3, all at once (9 processes), one thread each; a run stopped
#   by the budget checkpoints (SIGTERM) and continues with `--resume` (its command is in its output file).
# Each step's output goes to OUTPUT_FOLDER (default gpu_check/) as one file per kind of step, and a summary to log.txt;
# a step is skipped when fewer seconds are left of BUDGET (default 520; boxing: 580, after which its runs are stopped)
# than it needs, so that either mode ends within 10 minutes.
set -u
mode=${1:-checks}
out=${2:-gpu_check}
case $mode in checks|boxing) ;; *) echo "usage: bash tests/gpu_check.sh [checks|boxing] [OUTPUT_FOLDER]" >&2; exit 2;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
BUDGET=${BUDGET:-$([ "$mode" = boxing ] && echo 580 || echo 520)}
log=$out/log.txt

note() { echo "=== $(date +%T) t=${SECONDS}s $*" | tee -a "$log"; }

step() {  # step NAME CAP NEED COMMAND...: run COMMAND for at most CAP seconds if NEED seconds are left
    local name=$1 cap=$2 need=$3 left=$((BUDGET - SECONDS)) file=$out/${1%%_*}.txt
    shift 3
    if [ "$left" -lt "$need" ]; then note "skip $name ($left s left)"; return; fi
    [ "$cap" -gt "$left" ] && cap=$left
    note "$name (at most ${cap} s): $*"
    echo "=== $name: $*" >>"$file"
    timeout -k 5 "$cap" "$@" >>"$file" 2>&1
    echo "rc=$?" >>"$file"
    tail -3 "$file" >>"$log"
}

note "start: $mode"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
} >>"$log" 2>&1

if [ "$mode" = checks ]; then
    for config in v2 decoder-free tiny small v3 v1; do
        step speed_bf16_$config 60 25 python3 tests/bench_speed.py --configs $config --updates 10 --prefill 1000
    done
    for config in tiny small; do
        step speed_compile_$config 120 40 python3 tests/bench_speed.py --configs $config --updates 20 --prefill 1000 --compile
    done
    step run_ctrl-c 60 55 timeout -s INT 50 python3 dreamer_atari.py --env SpaceInvaders --log-seconds 10
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist, where the machine has it
    step pytest_cuda 170 90 python3 -m pytest tests -q $workers --deselect tests/test_learning.py -p no:cacheprovider -rfE
    for config in v2 decoder-free; do
        step speed_fp32_$config 60 25 python3 tests/bench_speed.py --configs $config --updates 10 --prefill 1000 --no-amp
    done
else
    for preset in ${PRESETS:-v2 decoder-free v3}; do
        for seed in 1 2 3; do
            OMP_NUM_THREADS=1 timeout -k 5 $((BUDGET - SECONDS)) python3 tests/bench_learning.py --env Boxing \
                --total-steps 40000 --preset $preset --seed $seed --threads 1 >"$out/boxing_${preset}_$seed.txt" 2>&1 &
        done
    done
    wait
    grep -h "RESULT\|^command" "$out"/boxing_*.txt >>"$log"
fi
note done
