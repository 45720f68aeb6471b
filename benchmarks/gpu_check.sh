#!/usr/bin/env bash
# The prepared GPU check: run it in one go on a lent H100/H200 (never run yet: no GPU was lent
# to the work so far). It installs t2f from the working tree, runs the GPU-marked tests and the
# benchmarks, and writes everything under $OUT.
#
# Before (on the development machine, in the repo root; the GPU machine has torch, onnx,
# onnxruntime (CPU), numpy, click, tqdm, pillow, safetensors, timm, huggingface_hub):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth regex
# Then run with .whl carried:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/t2f-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 T2F_OFFLINE=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# GPU-marked tests (skipped on the CPU machines), then the whole suite once.
python3 -m pytest -q -p no:warnings tests -k "cuda or cudagraph or tensorrt or fp16" 2>&1 | tee "$OUT/tests-gpu.log"
python3 -m pytest -q -p no:warnings -x tests 2>&1 | tail -5 | tee "$OUT/tests-all.log"

# Latency: 1024 px, random weights, every backend beside eager fp32.
t2f-bench --generator random-1024 --clip ViT-B-32:random --device cuda --batches 1,8,32 --iters 30 \
    --json "$OUT/bench-1024.json" --markdown "$OUT/bench-1024.md" 2>&1 | tail -20

# Trainer throughput at 1024 with ViT-B-32.
python3 benchmarks/train_throughput.py --generator random-1024 --clip ViT-B-32:random --device cuda \
    --samples 512 --synth-batch 32 --steps 300 --batch 256 --json "$OUT/train-1024.json" 2>&1 | tail -20
