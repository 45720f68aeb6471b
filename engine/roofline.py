"""Distance to the limit: the FLOPs of each stage, this machine's measured GEMM peak, and the share of it a run reaches.

stage_flops(generator, clip, mapper, batch)  -> {"text_encoder", "mapper", "synthesis", "end_to_end"}: FLOPs of one call
peak_gflops(device, dtype, seconds)         -> GFLOP/s of a compute-bound square matmul here (None where the dtype cannot run)
distance(flops, ms, peak_gflops)            -> {"gflops_per_s", "share_of_peak"}
cpu_has_bf16()                              -> whether this CPU has bf16 instructions (avx512_bf16 or amx_bf16)

What is counted. FLOPs are PyTorch's `torch.utils.flop_counter.FlopCounterMode` count, 2 per
multiply-add, of the very graph modules the pipeline runs (`GraphSpec.module` in fp32: the
TextEncoderGraph, MapperGraph and SynthesisGraph; open_clip's own text encoder for a text tower the
TextEncoderGraph cannot express, as `torch` runs it), run once on the meta device at `batch` rows,
so counting a 1024 px generator at batch 32 computes nothing and takes about a second.
Counted, each at its true size:
  - matrix products: aten.mm, addmm, bmm, baddbmm (every nn.Linear / F.linear, CLIP's q @ k^T and
    attention @ v, the affine layers, the demodulation matrix product, the mapper's MLPs);
  - every convolution through aten.convolution, with groups and transposition taken into account:
    the modulated 3x3 convs, the 1x1 ToRGB convs, the stride-2 transposed 3x3 up-sampling convs
    (counted at their input resolution: 9 * C_in * C_out multiply-adds per input pixel, as NVIDIA
    counts them), the depthwise [1,3,3,1] FIR blur after them (16 multiply-adds per output pixel
    and channel) and the depthwise transposed FIR up-sampling of the RGB skip image (16 per input
    pixel and channel). tests/test_roofline.py checks the synthesis count against a count written
    out by hand from the config, these blur and up-sampling convs included;
  - scaled_dot_product_attention, in every variant PyTorch's counter knows plus the CPU kernel
    (`_scaled_dot_product_flash_attention_for_cpu`) it does not: registered here with the same
    formula (4 * batch * heads * queries * keys * head_dim). No t2f graph calls it today (the
    text encoder writes its attention as two matrix products); it is there so that one that does is
    not silently counted as zero.
Not counted (as in the ~148 GFLOP per 1024 px image usually quoted for StyleGAN2 config-f, which
counts only convolutions and matrix products): elementwise and reduction ops (modulation and demodulation multiplies, noise,
bias, leaky ReLU, clamp, rsqrt, LayerNorm, softmax, GELU, the L2 normalization, the uint8
conversion), embeddings, gathers and copies. At one operation per output element they are about
0.12 G per 256 px image against 30.1 GFLOP counted, and 1.0 G per 1024 px image against 150.7:
under 1%. They are memory-bound, though, and are where a GPU spends most of its time (profiled in
fp16 at 1024 px, the convolutions' matrix products take under a tenth of it, the blur and the
elementwise kernels about three quarters), which is why the share of the GEMM peak is a distance, not
a goal of 100%.

Per image, the 256 px synthesis (`random-256`) counts 30.07 GFLOP, and the 1024 px one (`random-1024`,
config-f) 150.67 GFLOP = 75.3 G multiply-adds: 74.27 G in the convolutions and matrix products (the
quoted ~74 G, ~148 GFLOP) plus 1.07 G in the FIR blur and RGB up-sampling that figure leaves out. The
ViT-B-32 text encoder adds 5.96 GFLOP per row, the tiny mapper well under 0.01.

Every counted op is linear in the batch, so the counts are exactly proportional to `batch` (a
test asserts it); with a mean head the mapper runs its net on the (z, -z) pair, and both halves count.

The peak is measured, not looked up: the best of a few timed square matmuls after a warm-up, with
torch's current thread count (and, on CUDA, its current TF32 setting: fp32 is true fp32 unless the
caller allowed TF32). On the CPU fp16 is refused (None): t2f runs fp16 only on CUDA
(Precision.check_device), and PyTorch's CPU fp16 matmul without AVX512-FP16 is an emulation at
about 1 GFLOP/s, a meaningless peak. bf16 on the CPU needs `cpu_has_bf16()`; without it PyTorch
emulates bf16 too, so the answer is None as well.
"""

from __future__ import annotations

import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from t2f.graphs import GRAPHS, ModelDims, UnsupportedTextTower
from t2f.specs import graph_specs
from t2f.precision import cpu_has_bf16, has_bf16_flag  # noqa: F401  (re-exported)
from t2f.precision import Precision

STAGES = (*GRAPHS, "end_to_end")
PEAK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------
# FLOPs of each stage.


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for the CPU flash-attention kernel, which PyTorch's counter leaves out."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_formulas() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _cpu_sdpa_flop}        # keyed by the op packet, as the counter looks ops up


def count_flops(fn, *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of `fn(*inputs)` as counted by FlopCounterMode with this module's formulas, no grad."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_formulas())
    with torch.no_grad(), counter:
        fn(*inputs)
    return counter.get_total_flops()


def stage_flops(generator, clip, mapper, batch: int) -> dict[str, float]:
    """FLOPs of one call of each stage at `batch` rows, and their sum as "end_to_end" (see the module docstring).

    The fp32 graph modules the pipeline runs are built from the models (on their device), moved to the
    meta device and run on meta inputs from each GraphSpec: no arithmetic is done and no model memory
    is held at `batch`. The precision does not change the count (the same ops run in fp16 or bf16).
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    specs = graph_specs(ModelDims.of(generator, clip, mapper))
    flops = {}
    for name, spec in specs.items():
        inputs = [t.to("meta") for t in spec.example_inputs(batch, 0, generator, clip, mapper)]
        try:
            module = spec.module(generator, clip, mapper, Precision.FP32).to("meta")
        except UnsupportedTextTower:        # `torch` runs open_clip's own text encoder: run on meta views of its weights
            encoder = clip.text_encoder
            meta = {k: v.to("meta") for k, v in (*encoder.named_parameters(), *encoder.named_buffers())}
            module = lambda tokens: torch.func.functional_call(encoder, meta, (tokens.long(),))  # noqa: E731
        flops[name] = float(count_flops(module, *inputs))
        del module
    flops["end_to_end"] = sum(flops[name] for name in GRAPHS)
    return flops


# ----------------------------------------------------------------------------
# This machine's peak.


def peak_runs(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `peak_gflops` measures `dtype` on `device` (else it returns None): see the module docstring."""
    device = torch.device(device)
    if dtype not in PEAK_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, PEAK_DTYPES))}, got {dtype}")
    if device.type == "cpu":
        return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_bf16())
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    raise ValueError(f"peak_gflops measures a cpu or cuda device, got {device}")


def peak_gflops(device: torch.device | str, dtype: torch.dtype, seconds: float = 0.5,
                size: int | None = None) -> float | None:
    """This machine's compute-bound matmul rate in GFLOP/s for `dtype` on `device`; None where it does not run there.

    device:  "cpu" or a CUDA device; the CPU uses torch's current thread count.
    dtype:   torch.float32, torch.bfloat16 or torch.float16.
    seconds: time spent in timed runs after one warm-up; at least 3 timed runs whatever it says.
    size:    side of the square matrices; None = 2048 on the CPU, 8192 on CUDA (both compute-bound).

    The best of the timed runs (on CUDA, events around 10 back-to-back products, after a synchronize).
    On this 2-core development CPU a call costs about 3 matmuls plus `seconds`: about 1 s in fp32.
    """
    device = torch.device(device)
    if not peak_runs(device, dtype):
        return None
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a non-negative number, got {seconds!r}")
    n = size or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn([n, n], generator=g).div_(math.sqrt(n)).to(device=device, dtype=dtype) for _ in range(2))
    c = torch.empty([n, n], device=device, dtype=dtype)
    if device.type == "cuda":
        return _peak_cuda(a, b, c, seconds)
    torch.matmul(a, b, out=c)                                  # warm-up: first-call packing and allocation
    best, spent, runs = math.inf, 0.0, 0
    while runs < 3 or spent < seconds:
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return 2 * n**3 / best / 1e9


def _peak_cuda(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, seconds: float, reps: int = 10) -> float:
    n = a.shape[0]
    with torch.cuda.device(a.device):
        for _ in range(3):                                     # warm-up: cuBLAS handle, heuristics, clocks
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best, spent, runs = math.inf, 0.0, 0
        while runs < 3 or spent < seconds:
            start.record()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3 / reps
            best, spent, runs = min(best, elapsed), spent + elapsed * reps, runs + 1
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------
# The distance.


def distance(flops: float, ms: float, peak_gflops: float | None) -> dict[str, float | None]:
    """Achieved GFLOP/s of `flops` done in `ms` milliseconds, and its share of `peak_gflops` (None if no peak)."""
    if not (ms > 0 and math.isfinite(ms)):
        raise ValueError(f"ms must be a positive number, got {ms!r}")
    if not (flops >= 0 and math.isfinite(flops)):
        raise ValueError(f"flops must be a non-negative number, got {flops!r}")
    achieved = flops / (ms * 1e-3) / 1e9
    share = None if peak_gflops is None or not peak_gflops > 0 else achieved / peak_gflops
    return dict(gflops_per_s=achieved, share_of_peak=share)
