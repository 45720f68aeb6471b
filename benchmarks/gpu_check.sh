#!/usr/bin/env bash
# The GPU check: what a first run of t2f on a CUDA GPU must show, in one run that ends within BUDGET (440) seconds.
#
#   bash benchmarks/gpu_check.sh OUTDIR                  # or OUT=OUTDIR bash benchmarks/gpu_check.sh
#   WHEELS=DIR bash benchmarks/gpu_check.sh OUTDIR       # pip install --no-index DIR/*.whl first (default: .whl if there)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --cpu-dry-run OUTDIR    # the same steps, tiny models, a CPU
#
# Steps (limits, the budget and what each measures: benchmarks/README.md), each under its own timeout, clamped so
# that the whole check ends by the deadline:
#   0-setup              wheels and t2f (from a copy of this checkout) into a private site folder; versions
#   1-tests-gpu          the GPU-marked tests
#   2-parity-1024        eager fp32 vs eager fp16 vs torch-cudagraph at 1024 px
#   3-bench-1024         t2f-bench: eager fp32 (t2f's numerics and PyTorch's defaults), eager fp16, torch-cudagraph;
#                        NCHW and channels_last; batches 1 and 32
#   4-first-image-cudagraph       t2f-infer in a new process, 1024 px fp16, torch-cudagraph: time to the first PNG
#   5-first-image-compile-cold    the same with torch-compile and an empty Inductor cache
#   6-first-image-compile-warm    the same again: Inductor's cache warm
#   7-compile-1024       t2f-bench: torch-compile fp16, NCHW and channels_last, batches 1 and 32 (last: it may be cut)
# What it leaves in OUTDIR: summary.txt (a line per step: rc, seconds, limit) and t2f-gpu-check.tar.gz (results/:
# every step's log, JSON and markdown, env.txt, gpu-before.txt, gpu-after.txt, summary.txt), packed after every step.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY=1; shift; fi
OUT=${1:-${OUT:-/tmp/t2f-gpu-check}}
ARCHIVE=t2f-gpu-check.tar.gz
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-}
if [ -z "$WHEELS" ] && [ -d .whl ]; then WHEELS=.whl; fi
if [ -n "$WHEELS" ]; then WHEELS=$(cd "$WHEELS" && pwd) || exit 1; fi      # the steps run elsewhere: absolute paths
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") || exit 1 ;; esac
if [ "$DRY" = 1 ]; then BUDGET=${BUDGET:-1500}; else BUDGET=${BUDGET:-440}; fi

source "$ROOT/benchmarks/gpu_steps.sh"
begin
mkdir -p "$WORK/run" && cd "$WORK/run" || exit 1           # not the checkout: its t2f/ would shadow the site's
SITE=$WORK/site
export PYTHONUNBUFFERED=1 T2F_OFFLINE=1 HF_HUB_OFFLINE=1 T2F_CACHE=$WORK/cache PY SITE WHEELS WORK RESULTS ROOT
export -f install_site
export COPY_MODULES=""
if [ "$DRY" = 1 ]; then
    # Tiny models on the CPU, the same steps otherwise. What a GPU machine may lack is hidden here (open_clip, ftfy and
    # wcwidth come back through the set-up, as the wheels do there), and onnxruntime, which no step may need: a step
    # that needs any of them fails here first.
    hide_modules "$WORK/hidden" matplotlib openvino onnxruntime onnxslim open_clip ftfy wcwidth
    COPY_MODULES="open_clip ftfy wcwidth"
    DEVICE=cpu GEN=tiny CLIP=tiny PRECISION=fp32 FIRST_BACKEND=torch
    T_SETUP=200 T_TESTS=400 T_PARITY=200 T_BENCH=300 T_FIRST=120 T_COLD=300 T_WARM=200 T_COMPILE=400
    BENCH=(--backends torch:fp32,torch-cudagraph --warmup 1 --iters 2)
    COMPILE=(--backends torch-compile:fp32 --batches 1 --memory-formats nchw --warmup 0 --iters 2)   # Inductor on a CPU: slow
else
    DEVICE=cuda GEN=random-1024 CLIP=ViT-B-32:random PRECISION=fp16 FIRST_BACKEND=torch-cudagraph
    T_SETUP=35 T_TESTS=100 T_PARITY=30 T_BENCH=55 T_FIRST=25 T_COLD=75 T_WARM=25 T_COMPILE=150
    BENCH=(--backends torch:fp16,torch-cudagraph --warmup 1 --iters 8)
    COMPILE=(--backends torch-compile:fp16 --batches 1,32 --memory-formats nchw,channels_last --warmup 1 --iters 8)
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH    # before the hidden modules: the set-up's win
[ "$DEVICE" = cuda ] && gpu_state "$RESULTS/gpu-before.txt"

step 0-setup "$T_SETUP" bash -c install_site
step 1-tests-gpu "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --continue-on-collection-errors "$ROOT/tests"
step 2-parity-1024 "$T_PARITY" "$PY" "$ROOT/benchmarks/gpu_parity.py" --generator "$GEN" --clip "$CLIP" --device "$DEVICE" \
    --json "$RESULTS/2-parity-1024.json"
step 3-bench-1024 "$T_BENCH" "$PY" -m t2f.engine.bench --generator "$GEN" --clip "$CLIP" --device "$DEVICE" \
    --batches 1,32 --memory-formats nchw,channels_last "${BENCH[@]}" \
    --json "$RESULTS/3-bench-1024.json" --markdown "$RESULTS/3-bench-1024.md"
# Time to the first image: a new process each (imports, weights, CUDA start, capture or compile, the PNG written).
INFER=("$PY" -m t2f.engine.cli --generator "$GEN" --clip "$CLIP" --mapper tiny --device "$DEVICE" --precision "$PRECISION"
       --n 1 --batch 1 "a smiling woman with red hair")
mkdir -p "$WORK/images"
step 4-first-image-cudagraph "$T_FIRST" "${INFER[@]}" --backend "$FIRST_BACKEND" --out "$WORK/images/cudagraph.png"
export T2F_CACHE=$WORK/compile-cache                    # an empty Inductor cache, warm for the steps after it
step 5-first-image-compile-cold "$T_COLD" "${INFER[@]}" --backend torch-compile --out "$WORK/images/compile-cold.png"
step 6-first-image-compile-warm "$T_WARM" "${INFER[@]}" --backend torch-compile --out "$WORK/images/compile-warm.png"
# No baselines here: step 3 timed them (the speed-ups are against its rows) and step 1 holds torch-compile to eager.
step 7-compile-1024 "$T_COMPILE" "$PY" -m t2f.engine.bench --generator "$GEN" --clip "$CLIP" --device "$DEVICE" \
    --no-stages --no-baseline "${COMPILE[@]}" \
    --json "$RESULTS/7-compile-1024.json" --markdown "$RESULTS/7-compile-1024.md"
[ "$DEVICE" = cuda ] && gpu_state "$RESULTS/gpu-after.txt"
exit "$FAILED"                                            # 0: every step ran and passed
