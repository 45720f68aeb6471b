#!/usr/bin/env bash
# The GPU check: one 600-second device call on an H100/H200 (torch 2.11 cu130, onnx, CPU-only onnxruntime;
# open_clip, ftfy and wcwidth travel as wheels in .whl). How to launch it: benchmarks/README.md.
#
# Steps, most valuable first, each under its own timeout; every step's output goes to $OUT as it is produced:
#   1. the GPU-marked tests                                  ($OUT/1-tests-gpu.log)
#   2. parity at 1024 px, random weights: eager fp32 vs eager fp16 vs torch-cudagraph
#                                                            ($OUT/2-parity-1024.log, .json)
#   3. t2f-bench at 1024 px, torch and torch-cudagraph, batches 1, 8, 32, speed-up over eager fp32
#                                                            ($OUT/3-bench-1024.log, .json, .md)
#   4. t2f-bench at 1024 px, torch-compile fp16 (Inductor, CUDA graphs) beside eager fp32, batches 1, 8, 32,
#      with its first-call (compile) time                    ($OUT/4-compile-1024.log, .json, .md)
#   5. trainer throughput at 1024 px with ViT-B-32           ($OUT/5-train-1024.log, .json)
# $OUT/summary.txt: one line per step with its exit code and seconds (124 = its timeout).
# Longer work (the whole suite, export, more samples) is in benchmarks/gpu_check_long.sh.
#
#   bash benchmarks/gpu_check.sh --cpu-dry-run     # the same steps on tiny models on this CPU (shell logic, seconds),
#                                                  # with matplotlib hidden as on the GPU image
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
OUT=${OUT:-/tmp/t2f-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 T2F_OFFLINE=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

source benchmarks/gpu_steps.sh
if [ "$DRY" = 1 ]; then
    # Tiny models on the CPU, same steps and options otherwise; timeouts for a contended 2-core machine.
    # What the GPU image lacks is hidden here too, so a step that needs it fails here first.
    hide_modules "$OUT/hidden-modules" matplotlib openvino onnxslim
    if $PY -c "import matplotlib" 2>/dev/null; then echo "could not hide matplotlib" >&2; exit 1; fi
    DEVICE=cpu GEN=tiny CLIP=tiny T_TESTS=300 T_PARITY=300 T_BENCH=400 T_COMPILE=400 T_TRAIN=400
    TRAIN_ARGS=(--samples 64 --synth-batch 16 --steps 20 --batch 32)
    BENCH_ARGS=(--warmup 1 --iters 3)
    COMPILE_ARGS=(--warmup 0 --iters 2)
else
    DEVICE=cuda GEN=random-1024 CLIP=ViT-B-32:random T_TESTS=80 T_PARITY=70 T_BENCH=140 T_COMPILE=170 T_TRAIN=80
    TRAIN_ARGS=(--samples 256 --synth-batch 32 --steps 40 --batch 64 --clip-every 10)
    BENCH_ARGS=(--warmup 3 --iters 20)
    COMPILE_ARGS=(--warmup 2 --iters 10)
    # Set-up (about 20 s): the wheels, then t2f itself, from the working tree.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee "$OUT/0-setup.log" || { echo "no wheels in .whl (see benchmarks/README.md)" | tee -a "$OUT/0-setup.log"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tee -a "$OUT/0-setup.log" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, t2f; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 't2f', t2f.__version__)" \
    2>&1 | tee -a "$OUT/0-setup.log"

: > "$OUT/summary.txt"

TESTS=(tests)
[ "$DRY" = 1 ] && TESTS=(tests/test_backends.py tests/test_engine.py)   # the dry run: the selection logic, quickly
step 1-tests-gpu "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -m gpu -rs "${TESTS[@]}"
step 2-parity-1024 "$T_PARITY" $PY benchmarks/gpu_parity.py --generator "$GEN" --clip "$CLIP" --device "$DEVICE" \
    --json "$OUT/2-parity-1024.json"
step 3-bench-1024 "$T_BENCH" $PY -m t2f.engine.bench --generator "$GEN" --clip "$CLIP" --device "$DEVICE" \
    --backends torch,torch-cudagraph --batches 1,8,32 "${BENCH_ARGS[@]}" \
    --json "$OUT/3-bench-1024.json" --markdown "$OUT/3-bench-1024.md"
COMPILE=torch-compile:fp16 COMPILE_BATCHES=1,8,32
[ "$DRY" = 1 ] && COMPILE=torch-compile:fp32 COMPILE_BATCHES=1       # fp16 runs on CUDA only; Inductor on 2 CPU cores is slow
step 4-compile-1024 "$T_COMPILE" $PY -m t2f.engine.bench --generator "$GEN" --clip "$CLIP" --device "$DEVICE" \
    --backends "$COMPILE" --batches "$COMPILE_BATCHES" "${COMPILE_ARGS[@]}" \
    --json "$OUT/4-compile-1024.json" --markdown "$OUT/4-compile-1024.md"
step 5-train-1024 "$T_TRAIN" $PY benchmarks/train_throughput.py --generator "$GEN" --clip "$CLIP" --device "$DEVICE" \
    "${TRAIN_ARGS[@]}" --json "$OUT/5-train-1024.json"
cat "$OUT/summary.txt"
