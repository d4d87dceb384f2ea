#!/usr/bin/env bash
# One device call that installs the project, runs the GPU test suite and the GPU benchmarks.
# Usage on the device machine (from the repo root, with .whl carried for expecttest):
#   bash benchmarks/device_suite.sh [tests|kernels|linear|launcher|model|train|real|small|moe|grad|trainers ...]
#   (default: tests kernels linear real)
# Logs and RESULTS.md land in $OUT (or ./device-out when OUT is unset).
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || {
    cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests kernels linear real)
for step in "${steps[@]}"; do
    echo "=== $step"
    case "$step" in
        tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" | tail -25 ;;
        kernels) python3 benchmarks/kernels.py 2>&1 | tee "$out/kernels.log" | tail -40 ;;
        linear) python3 benchmarks/linear.py 2>&1 | tee "$out/linear.log" | tail -40 ;;
        # Small shapes: kernels and launches per step, then the same with Inductor's static
        # launcher for our kernels. Only its environment variable reaches Inductor's compile
        # workers (a config patch does not), hence a second process.
        launcher) for static in 0 1; do
            TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=$static python3 \
                benchmarks/linear.py --shapes 8192x768x768,8192x768x3072,8192x2048x2048 \
                --breakdown 8192x768x768 --section "Linear layer: small shapes, static launcher $static" \
                2>&1 | tee "$out/linear_small_static$static.log" | tail -40
            done ;;
        model) python3 benchmarks/model.py 2>&1 | tee "$out/model.log" | tail -30 ;;
        # One seed's three backends at once (SEEDS="0" by default): 100M tokens each, ~9.5 min.
        # The run folders come back as one tar ($OUT keeps only shallow paths).
        train) python3 benchmarks/train_compare.py --corpus site-packages --steps 3052 --jobs 3 \
            --seeds ${SEEDS:-0} --minutes-per-backend 9 --runs-dir /tmp/train_compare 2>&1 |
            tee "$out/train.log" | tail -30
            tar -C /tmp -cf "$out/train_compare.tar" train_compare ;;
        real) python3 benchmarks/real_models.py --json "$out/real_models.json" 2>&1 |
            tee "$out/real_models.log" | tail -30 ;;
        # Issue 16's launch-bound models, compiled by default and under CUDA graphs (~8 min).
        small) for mode in default reduce-overhead; do
            python3 benchmarks/real_models.py --models gpt2_6l,qwen3_768 --seq 512 \
                --steps 100 --mode $mode --section "Real models: small, mode $mode" \
                --time-budget 220 --json "$out/real_models_small_$mode.json" 2>&1 |
                tee "$out/real_models_small_$mode.log" | tail -12
            done ;;
        moe) python3 benchmarks/real_models.py --models qwen3_moe --dtype bf16-params \
            --section "Real models: mixture of experts" --time-budget 300 \
            --json "$out/real_models_moe.json" 2>&1 | tee "$out/real_models_moe.log" | tail -30 ;;
        grad) python3 benchmarks/grad_error.py --json "$out/grad_error.json" --results 2>&1 |
            tee "$out/grad_error.log" | tail -40 ;;
        trainers) python3 benchmarks/trainers.py --results --json "$out/trainers.json" 2>&1 |
            tee "$out/trainers.log" | tail -30 ;;
        *) echo "unknown step $step" ;;
    esac
    status=$?
    [ $status -ne 0 ] && echo "=== $step FAILED (exit status $status)"
done
cp benchmarks/RESULTS.md "$out/" 2>/dev/null
[ -f docs/loss_curves.png ] && cp docs/loss_curves.png "$out/"
exit 0
