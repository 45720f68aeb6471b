#!/usr/bin/env bash
# The longer GPU work that does not fit benchmarks/gpu_check.sh, in a second run of at most BUDGET (440) seconds, with
# the same use, set-up and output (summary.txt and t2f-gpu-check-long.tar.gz in OUTDIR; see benchmarks/README.md):
#
#   bash benchmarks/gpu_check_long.sh OUTDIR            # or OUT=OUTDIR; WHEELS=DIR as for gpu_check.sh
#
#   0-setup          the wheels and t2f into a private site folder; versions
#   1-suite          the whole test suite on the GPU machine
#   2-bench-1024-p99 t2f-bench at 1024 px with 100 timed rounds (p99), torch and torch-cudagraph, batches 1, 8, 32
#   3-train-1024     trainer throughput at 1024 px with ViT-B-32 (PyTorch's numerics, as t2f-train runs; labelled)
#   4-export-1024    t2f-export --fp16 --onnx-only of random-1024 (parity on the CPU provider there)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

OUT=${1:-${OUT:-/tmp/t2f-gpu-check-long}}
ARCHIVE=t2f-gpu-check-long.tar.gz
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-}
if [ -z "$WHEELS" ] && [ -d .whl ]; then WHEELS=.whl; fi
if [ -n "$WHEELS" ]; then WHEELS=$(cd "$WHEELS" && pwd) || exit 1; fi      # the steps run elsewhere: absolute paths
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") || exit 1 ;; esac
BUDGET=${BUDGET:-440}

source "$ROOT/benchmarks/gpu_steps.sh"
begin
mkdir -p "$WORK/run" && cd "$WORK/run" || exit 1           # not the checkout: its t2f/ would shadow the site's
SITE=$WORK/site
export PYTHONUNBUFFERED=1 T2F_OFFLINE=1 HF_HUB_OFFLINE=1 T2F_CACHE=$WORK/cache PY SITE WHEELS WORK RESULTS ROOT COPY_MODULES=""
export -f install_site
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
gpu_state "$RESULTS/gpu-before.txt"

step 0-setup 35 bash -c install_site
step 1-suite 150 "$PY" -m pytest -q -p no:cacheprovider -rs --continue-on-collection-errors "$ROOT/tests"
step 2-bench-1024-p99 90 "$PY" -m t2f.engine.bench --generator random-1024 --clip ViT-B-32:random --device cuda \
    --backends torch:fp16,torch-cudagraph --batches 1,8,32 --warmup 3 --iters 100 \
    --json "$RESULTS/2-bench-1024-p99.json" --markdown "$RESULTS/2-bench-1024-p99.md"
step 3-train-1024 70 "$PY" "$ROOT/benchmarks/train_throughput.py" --generator random-1024 --clip ViT-B-32:random --device cuda \
    --samples 512 --synth-batch 32 --steps 100 --batch 256 --json "$RESULTS/3-train-1024.json"
step 4-export-1024 60 "$PY" -m t2f.export.cli --mapper tiny --generator random-1024 --clip ViT-B-32:random \
    --out "$WORK/export-1024" --fp16 --onnx-only
gpu_state "$RESULTS/gpu-after.txt"
exit "$FAILED"
