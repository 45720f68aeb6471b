#!/usr/bin/env bash
# The longer GPU work that does not fit benchmarks/gpu_check.sh's one 600-second call: run it in a second call
# (same set-up, same carry). Steps under their own timeouts, output into $OUT as produced:
#   1. the whole test suite on the GPU machine                       ($OUT/1-suite.log)
#   2. t2f-bench at 1024 px with 100 timed runs (p99), batches 1, 8, 32   ($OUT/2-bench-1024-p99.*)
#   3. a longer trainer throughput run at 1024 px with ViT-B-32       ($OUT/3-train-1024.*)
#   4. t2f-export --fp16 --onnx-only of random-1024 (parity on the CPU provider there)   ($OUT/4-export-1024.log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/t2f-gpu-check-long}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 T2F_OFFLINE=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1

: > "$OUT/summary.txt"
source benchmarks/gpu_steps.sh
step 1-suite 200 $PY -m pytest -q -p no:cacheprovider -rs tests
step 2-bench-1024-p99 130 $PY -m t2f.engine.bench --generator random-1024 --clip ViT-B-32:random --device cuda \
    --backends torch,torch-cudagraph --batches 1,8,32 --warmup 5 --iters 100 \
    --json "$OUT/2-bench-1024-p99.json" --markdown "$OUT/2-bench-1024-p99.md"
step 3-train-1024 100 $PY benchmarks/train_throughput.py --generator random-1024 --clip ViT-B-32:random --device cuda \
    --samples 1024 --synth-batch 32 --steps 200 --batch 256 --json "$OUT/3-train-1024.json"
step 4-export-1024 150 $PY -m t2f.export.cli --mapper tiny --generator random-1024 --clip ViT-B-32:random \
    --out /tmp/t2f-export-1024 --fp16 --onnx-only
cat "$OUT/summary.txt"
