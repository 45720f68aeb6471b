"""t2f-bench's rows: written as soon as each first call returns, kept when another row fails, two fp32 baselines
(the second with PyTorch's default numerics, restored after each of its calls), memory per row."""

import json

import pytest
import torch

import t2f.engine.bench as bench
from helpers import tiny_pipeline
from t2f.devices import PINNED, PYTORCH_DEFAULTS, cuda_numerics, fp32_label, numerics, pin_cuda_numerics, set_cuda_numerics
from t2f.engine.backends import Models
from t2f.engine.benchreport import BASELINE, DEFAULTS, DEFAULTS_LABEL, Run, markdown, speedups
from t2f.precision import Precision

CPU = torch.device("cpu")


@pytest.fixture
def flags():
    """The CUDA numerics flags as they were before the test, restored after it."""
    saved = cuda_numerics()
    yield
    set_cuda_numerics(saved)


@pytest.fixture
def fast(monkeypatch):
    """No GEMM peak measurement (seconds of the test's time, nothing it checks)."""
    import t2f.engine.roofline as roofline

    monkeypatch.setattr(roofline, "peak_gflops", lambda device, dtype, *args, **kwargs: 100.0 if dtype == torch.float32 else None)


def models(pipe):
    return Models(pipe.generator, pipe.clip, pipe.mapper)


def test_numerics_are_set_inside_the_block_and_restored_after_it(flags):
    pin_cuda_numerics()
    with numerics(PYTORCH_DEFAULTS):
        assert cuda_numerics() == PYTORCH_DEFAULTS
    assert cuda_numerics() == PINNED
    with pytest.raises(RuntimeError), numerics(PYTORCH_DEFAULTS):
        raise RuntimeError("a row failed")
    assert cuda_numerics() == PINNED
    assert fp32_label("cpu") == "fp32" and fp32_label("cuda") == "fp32"                     # pinned: true fp32
    with numerics(PYTORCH_DEFAULTS):
        assert fp32_label("cuda") == "fp32 (TF32 in cuDNN convolutions)" and fp32_label("cpu") == "fp32"
    torch.backends.cuda.matmul.fp32_precision = "tf32"       # torch's newer API: its legacy flag then cannot be read
    with numerics(PINNED):
        assert cuda_numerics() == PINNED
    assert cuda_numerics()["matmul_tf32"]


def test_runs_have_two_fp32_baselines_on_cuda_and_each_memory_format():
    cuda = torch.device("cuda")
    assert bench.runs_for(["torch-cudagraph"], cuda) == [BASELINE, DEFAULTS, Run("torch-cudagraph", Precision.FP16)]
    assert bench.runs_for(["torch-cudagraph"], CPU) == [BASELINE, Run("torch-cudagraph", Precision.FP16)]
    assert bench.runs_for(["torch:fp32"], CPU, memory_formats=("nchw", "channels_last")) == [
        BASELINE, Run("torch", Precision.FP32, "channels_last")]
    assert bench.runs_for(["torch-compile:fp16"], cuda, baseline=False, memory_formats=("nchw", "channels_last")) == [
        Run("torch-compile", Precision.FP16), Run("torch-compile", Precision.FP16, "channels_last")]
    assert DEFAULTS.label == DEFAULTS_LABEL and BASELINE.label == "torch"


def test_speedups_against_both_baselines():
    def row(run, batch, ms):
        return dict(run.fields(), batch=batch, stages=dict(end_to_end=dict(median_ms=ms)))

    rows = [row(BASELINE, 1, 20.0), row(DEFAULTS, 1, 10.0), row(Run("torch-cudagraph", Precision.FP16), 1, 5.0),
            row(Run("torch-cudagraph", Precision.FP16), 8, 8.0)]
    speedups(rows)
    assert [(r["speedup"], r["speedup_vs_defaults"]) for r in rows] == [(1.0, 0.5), (2.0, 1.0), (4.0, 2.0), (None, None)]


def test_rows_are_written_after_each_first_call_and_a_failing_row_loses_nothing(monkeypatch, fast):
    """Each row is saved (provisional) as soon as its first call returns; an exception of any type in a first call or
    in a round skips that row alone, with its type and message."""
    pipe = tiny_pipeline()
    saved = []
    real_outputs, real_measure = bench.outputs, bench.measure
    calls = []

    def outputs(backend, clip, inputs, stages=True):
        if backend.memory_format == "channels_last" and len(inputs.prompts) == 2:
            raise AssertionError("expected a live CUDA graph tree")                # what CUDA graph trees raise
        return real_outputs(backend, clip, inputs, stages)

    def measure(backend, clip, inputs, timer, stages=True):
        if (backend.name, backend.memory_format, len(inputs.prompts)) == ("torch-compile", "nchw", 1):
            calls.append(1)
            if len(calls) == bench.PROVISIONAL_CALLS + 2:                           # in the second timed round
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_measure(backend, clip, inputs, timer, stages)

    monkeypatch.setattr(bench, "outputs", outputs)
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)      # the backend's logic, not Inductor
    report = bench.benchmark(models(pipe), CPU, ["torch:fp32", "torch-compile:fp32"], [1, 2], warmup=0, iters=2,
                             save=lambda r: saved.append(json.loads(json.dumps(r, default=str))),
                             memory_formats=("nchw", "channels_last"))
    first = next(r for r in saved if r["results"])
    assert len(first["results"]) == 1 and first["results"][0]["provisional"] and first["results"][0]["first_call_ms"] > 0
    assert first["results"][0]["stages"]["end_to_end"]["samples"] == bench.PROVISIONAL_CALLS
    assert [len(r["results"]) for r in saved if r["results"]][:3] == [1, 2, 3]              # one more per first call
    skipped = {(s["backend"], s["memory_format"], s.get("batch")): s["reason"] for s in report["skipped"]}
    assert skipped[("torch", "channels_last", 2)] == "AssertionError: expected a live CUDA graph tree"
    assert skipped[("torch-compile", "channels_last", 2)] == "AssertionError: expected a live CUDA graph tree"
    assert skipped[("torch-compile", "nchw", 1)] == "OutOfMemoryError: CUDA out of memory"
    kept = {(r["backend"], r["memory_format"], r["batch"]): r for r in report["results"]}
    assert set(kept) == {("torch", "nchw", 1), ("torch", "nchw", 2), ("torch", "channels_last", 1), ("torch-compile", "nchw", 1),
                         ("torch-compile", "nchw", 2), ("torch-compile", "channels_last", 1)}
    stopped = kept.pop(("torch-compile", "nchw", 1))               # stopped in its second round: its first round kept
    assert stopped["error"] == "OutOfMemoryError: CUDA out of memory" and stopped["stages"]["end_to_end"]["samples"] == 1
    assert all(not r["provisional"] and not r["error"] and r["stages"]["end_to_end"]["samples"] == 2 for r in kept.values())
    text = markdown(report)
    assert "| torch | fp32 | channels_last | 1 |" in text and "skipped torch-compile (fp32 batch 1): OutOfMemoryError" in text
    assert "| torch-compile (stopped: see below) | fp32 | nchw | 1 |" in text


def test_the_defaults_baseline_runs_with_pytorchs_numerics_and_the_other_rows_pinned(monkeypatch, flags, fast):
    """Rows are interleaved in one process: the PyTorch-defaults row's calls see PYTORCH_DEFAULTS, every other row
    (and the process after the run) t2f's pinned numerics; speed-ups against both baselines, in JSON and markdown."""
    pin_cuda_numerics()
    pipe = tiny_pipeline()
    seen = []
    real_measure = bench.measure

    def measure(backend, clip, inputs, timer, stages=True):
        seen.append((id(backend), cuda_numerics()))
        return real_measure(backend, clip, inputs, timer, stages)

    other = Run("torch", Precision.FP32, "channels_last")
    monkeypatch.setattr(bench, "runs_for", lambda names, device, baseline, formats: [BASELINE, DEFAULTS, other])
    monkeypatch.setattr(bench, "measure", measure)
    report = bench.benchmark(models(pipe), CPU, [], [1], warmup=1, iters=2)
    assert cuda_numerics() == PINNED
    # The two fp32 nchw baselines share one backend (built once); each row's calls, in the order rows run (each row's
    # provisional calls, then 3 interleaved rounds), see its own numerics.
    fp32, nhwc = seen[0][0], seen[-1][0]
    assert fp32 != nhwc
    rows_in_order = [(fp32, PINNED), (fp32, PYTORCH_DEFAULTS), (nhwc, PINNED)]
    assert seen == [r for r in rows_in_order for _ in range(bench.PROVISIONAL_CALLS)] + rows_in_order * 3
    rows = {(r["numerics"], r["memory_format"]): r for r in report["results"]}
    baseline, defaults, nhwc = rows[("t2f", "nchw")], rows[("pytorch-defaults", "nchw")], rows[("t2f", "channels_last")]
    assert defaults["speedup_vs_defaults"] == 1.0 and baseline["speedup"] == 1.0
    e2e = {k: r["stages"]["end_to_end"]["median_ms"] for k, r in rows.items()}
    assert nhwc["speedup"] == pytest.approx(e2e[("t2f", "nchw")] / e2e[("t2f", "channels_last")])
    assert nhwc["speedup_vs_defaults"] == pytest.approx(e2e[("pytorch-defaults", "nchw")] / e2e[("t2f", "channels_last")])
    assert f"| {DEFAULTS_LABEL} | fp32 | nchw | 1 |" in markdown(report)


@pytest.mark.gpu
def test_memory_is_read_per_row_on_cuda(flags):
    """Each row's peak is its own (reset before each of its calls): a larger batch needs more; the defaults baseline
    runs beside eager fp32 and the flags are pinned again after the run."""
    pipe = tiny_pipeline(device="cpu")
    report = bench.benchmark(models(pipe), torch.device("cuda"), ["torch-cudagraph"], [1, 16], warmup=0, iters=2)
    rows = {(r["backend"], r["numerics"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {(b, n, batch) for b, n in (("torch", "t2f"), ("torch", "pytorch-defaults"), ("torch-cudagraph", "t2f"))
                         for batch in (1, 16)}
    for backend, numerics_ in (("torch", "t2f"), ("torch-cudagraph", "t2f")):
        small, large = rows[(backend, numerics_, 1)], rows[(backend, numerics_, 16)]
        assert 0 < small["call_memory_mb"] < large["call_memory_mb"] and small["peak_memory_mb"] != large["peak_memory_mb"]
    assert all(r["speedup_vs_defaults"] is not None for r in report["results"]) and cuda_numerics() == PINNED
    assert rows[("torch", "pytorch-defaults", 1)]["cuda_numerics"] == PYTORCH_DEFAULTS
