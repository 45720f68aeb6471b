"""Backends beside eager PyTorch, the interactive loop, and t2f-bench, on the CPU with the tiny models.

Tests that run ONNX Runtime (or export, whose parity check runs it) are marked `needs_onnxruntime` and skip alone
where it is missing: the CUDA tests here run on a GPU machine without it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import TINY, randomize, tiny_pipeline
from t2f.engine.backends import (BackendUnavailable, CudaGraphBackend, Models, OnnxRuntimeBackend, OpenVINOBackend, TorchBackend,
                                 choose, make_backend)
from t2f.devices import importable
from t2f.engine.pipeline import TextToFace, sample_z
from t2f.precision import Precision

CPU = torch.device("cpu")

needs_onnxruntime = pytest.mark.skipif(not importable("onnxruntime"),
                                       reason='needs onnxruntime (and onnx, for the export): pip install -e ".[export]"')
needs_openvino = pytest.mark.skipif(not importable("openvino"), reason='the openvino backend needs OpenVINO: pip install -e ".[openvino]"')


def models(pipe, generator=None):
    return Models(generator or pipe.generator, pipe.clip, pipe.mapper)


def inputs(pipe, batch):
    prompts = ["a smiling woman", "an old man with white hair", "a child"] * batch
    tokens = pipe.clip.tokenize(prompts[:batch]).to(torch.int32)
    return tokens, sample_z(3, batch, 1, pipe.mapper.z_dim), torch.full([batch], 0.7)


def on_cuda(*made):
    """The tiny pipeline's models as each (backend class, precision) of `made` on CUDA, then 4 rows of inputs there."""
    pipe = tiny_pipeline(device="cuda")
    return (*(cls.create(models(pipe), torch.device("cuda"), precision) for cls, precision in made),
            *(t.cuda() for t in inputs(pipe, 4)))


@needs_onnxruntime
def test_onnxruntime_matches_eager(pipe):
    eager = TorchBackend(models(pipe), CPU, Precision.FP32)
    ort = make_backend("onnxruntime", models(pipe), CPU, Precision.FP32)
    assert isinstance(ort, OnnxRuntimeBackend)
    for batch in (1, 3):
        tokens, z, psi = inputs(pipe, batch)
        e_ref, e = eager.encode(tokens), ort.encode(tokens)
        assert ((e - e_ref).norm() / e_ref.norm()) < 1e-5
        ws_ref, ws = eager.map(e_ref, z, psi), ort.map(e_ref, z, psi)
        assert ((ws - ws_ref).norm() / ws_ref.norm()) < 1e-5
        a, b = eager(tokens, z, psi), ort(tokens, z, psi)
        assert a.shape == b.shape == (batch, 64, 64, 3) and a.dtype == b.dtype == torch.uint8
        assert (a.int() - b.int()).abs().max() <= 1


@pytest.mark.slow
@needs_onnxruntime
def test_onnxruntime_buffers_are_allocated_once_per_batch(pipe):
    ort = make_backend("onnxruntime", models(pipe), CPU, Precision.FP32)
    first = ort(*inputs(pipe, 2))
    pointer = first.data_ptr()
    second = ort(*inputs(pipe, 2))
    assert second.data_ptr() == pointer                    # the same output buffer, documented as reused
    assert ort(*inputs(pipe, 1)).data_ptr() != pointer


@needs_onnxruntime
def test_onnxruntime_pipeline_rows_do_not_depend_on_their_batch(pipe):
    """The exported graphs on the CPU too: a row alone and beside others, bit for bit (fixed-size blocks; and each
    block's ws is copied out of the backend's reused output buffer before the next block overwrites it)."""
    ort_pipe = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", backend="onnxruntime", batch_size=2)
    alone = ort_pipe._generate_rows([5], [1], [0.7], prompts=["a smiling woman"])
    five = ort_pipe._generate_rows([0, 5, 2, 3, 4], [0, 1, 0, 0, 2], [1.0, 0.7, 0.5, 0.9, 0.6],
                                      prompts=["a child", "a smiling woman", "an old man", "b", "c"])
    assert torch.equal(five.images[1], alone.images[0]) and torch.equal(five.ws[1], alone.ws[0])
    assert not torch.equal(five.ws[0], five.ws[2])
    infer = ort_pipe(["a smiling woman"], n=2, seed=5, truncation_psi=0.7)
    assert torch.equal(infer.images[1], alone.images[0]) and torch.equal(infer.ws[1], alone.ws[0])


@needs_onnxruntime
def test_pipeline_on_onnxruntime_equals_torch(pipe):
    ort_pipe = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", backend="onnxruntime")
    a = pipe(["a smiling woman", "a child"], n=2, seed=1, truncation_psi=0.7)
    b = ort_pipe(["a smiling woman", "a child"], n=2, seed=1, truncation_psi=0.7)
    assert torch.allclose(a.ws, b.ws, atol=1e-4)
    assert (a.images.int() - b.images.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="needs --backend torch"):
        ort_pipe(["a"], noise_mode="random")


@needs_openvino
@needs_onnxruntime
def test_auto_and_unavailable_backends(pipe, monkeypatch):

    import t2f.precision

    from t2f.precision import cpu_has_bf16

    # The CPU's preference list: OpenVINO bf16 where the CPU has bf16 and OpenVINO is there, else OpenVINO fp32, ...
    expected = (OpenVINOBackend, Precision.BF16 if cpu_has_bf16() else Precision.FP32)
    assert choose(CPU) == expected
    assert choose(CPU, precision=Precision.FP32) == (OpenVINOBackend, Precision.FP32)
    assert choose(CPU, "onnxruntime") == (OnnxRuntimeBackend, Precision.FP32)
    assert choose(CPU, "torch") == (TorchBackend, Precision.FP32)
    assert choose(CPU, noise_mode="random") == (TorchBackend, Precision.FP32)
    monkeypatch.setattr(t2f.precision, "cpu_has_bf16", lambda: False)
    assert choose(CPU) == (OpenVINOBackend, Precision.FP32)
    with pytest.raises(BackendUnavailable, match="bf16 needs a CPU with bfloat16 instructions"):
        choose(CPU, "openvino", Precision.BF16)
    import t2f.engine.backends.base as base

    real = base.importable
    monkeypatch.setattr(base, "importable", lambda name: name != "openvino" and real(name))   # as if it were not installed
    assert choose(CPU) == (OnnxRuntimeBackend, Precision.FP32)
    with pytest.raises(BackendUnavailable, match='openvino.*not installed.*t2f\\[openvino\\]'):
        choose(CPU, "openvino")
    with pytest.raises(BackendUnavailable, match="tensorrt needs a CUDA device"):
        make_backend("tensorrt", models(pipe), CPU)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        make_backend("torch-cudagraph", models(pipe), CPU)


@pytest.mark.gpu
def test_cudagraph_matches_eager_fp16():
    eager, graph, tokens, z, psi = on_cuda((TorchBackend, Precision.FP16), (CudaGraphBackend, Precision.FP16))
    a, b = eager(tokens, z, psi), graph(tokens, z, psi).clone()
    assert (a.float() - b.float()).abs().mean() < 2.0
    assert torch.equal(graph(tokens, z, psi), b)          # replays are deterministic


# ----------------------------------------------------------------------------
# The interactive loop and t2f-bench, as subprocesses.


def run(args, cwd, stdin=""):
    env = dict(os.environ, T2F_OFFLINE="1", HF_HUB_OFFLINE="1")
    bindir = os.path.dirname(sys.executable)
    exe = os.path.join(bindir, args[0]) if os.path.exists(os.path.join(bindir, args[0])) else args[0]
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@needs_onnxruntime
def test_interactive_loop(tmp_path):
    proc = run(["t2f-infer", "--generator", "tiny", "--clip", "tiny", "--mapper", "tiny", "--interactive", "--n", "2",
                "--backend", "onnxruntime", "--device", "cpu", "--out", "out.png"], tmp_path, stdin="a smiling woman\n\n  \nan old man\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[1] == "ms" and lines[0].endswith("a smiling woman")
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".png")) == ["out-0001.png", "out-0002.png"]
    assert "ready (onnxruntime on cpu, fp32" in proc.stderr and "2 prompt(s)" in proc.stderr


def test_interactive_refuses_prompt_arguments(tmp_path):
    proc = run(["t2f-infer", "--generator", "tiny", "--clip", "tiny", "--mapper", "tiny", "--interactive", "a"], tmp_path)
    assert proc.returncode == 2 and "standard input" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@needs_onnxruntime
def test_bench_writes_json_and_markdown_with_every_stage(tmp_path):
    proc = run(["t2f-bench", "--batches", "1,2", "--warmup", "1", "--iters", "3", "--backends", "onnxruntime,tensorrt",
                "--json", "bench.json", "--markdown", "bench.md", "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["backend"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)}
    for (backend, _), r in rows.items():
        stages = r["stages"]
        assert set(stages) == {"tokenize", "text_encoder", "mapper", "synthesis", "uint8_conversion", "device_to_host", "end_to_end"}
        assert all(v["median_ms"] > 0 for v in stages.values() if v is not None)
        assert (stages["uint8_conversion"] is None) == (backend == "onnxruntime")   # inside the exported graph
        assert abs(r["images_per_s"] - r["batch"] / stages["end_to_end"]["median_ms"] * 1000) < 1e-6
        eager = rows[("torch", r["batch"])]["stages"]["end_to_end"]["median_ms"]
        assert abs(r["speedup"] - eager / stages["end_to_end"]["median_ms"]) < 1e-9 and r["peak_memory_mb"] > 0
    assert [s["backend"] for s in report["skipped"]] == ["tensorrt"]
    assert "| onnxruntime | fp32 | nchw | 2 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_bench_bad_input(tmp_path):
    proc = run(["t2f-bench", "--batches", "0"], tmp_path)
    assert proc.returncode == 2 and "--batches" in proc.stderr
    proc = run(["t2f-bench", "--backends", "warp-drive"], tmp_path)
    assert proc.returncode == 2 and "unknown backends" in proc.stderr
    proc = run(["t2f-bench", "--memory-formats", "nchw,nhwc"], tmp_path)
    assert proc.returncode == 2 and "unknown memory formats ['nhwc']" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@needs_onnxruntime
def test_artifacts_of_other_models_are_refused(pipe, tmp_path):
    """--artifacts made for other weights, another config, or that failed parity are never run."""
    from t2f.export.onnx_export import export_artifacts
    from t2f.presets import random_generator
    from t2f.stylegan2 import Generator, GeneratorConfig

    out = tmp_path / "artifacts"
    export_artifacts(out, pipe.generator, pipe.clip, pipe.mapper, "fp32", [1], {})
    OnnxRuntimeBackend(models(pipe), CPU, Precision.FP32, out)   # the right models: fine
    other = randomize(random_generator("tiny"), seed=7)
    with pytest.raises(BackendUnavailable, match="exported from other models"):
        make_backend("onnxruntime", models(pipe, other), CPU, artifacts=str(out))
    # Same weights, another conv_clamp: another graph.
    clamped = Generator(GeneratorConfig.from_dict(dict(pipe.generator.config.to_dict(), conv_clamp=0.05)))
    clamped.load_state_dict(pipe.generator.state_dict())
    with pytest.raises(BackendUnavailable, match="exported from other models"):
        make_backend("onnxruntime", models(pipe, clamped), CPU, artifacts=str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["onnx"]["synthesis.onnx"]["parity_ok"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="failed its parity check"):
        make_backend("onnxruntime", models(pipe), CPU, artifacts=str(out))


@pytest.mark.slow
@needs_onnxruntime
def test_infer_with_mismatched_artifacts_gives_one_line(pipe, tmp_path):
    from t2f.export.onnx_export import export_artifacts
    from t2f.weights import save_generator
    from t2f.presets import random_generator

    export_artifacts(tmp_path / "a", pipe.generator, pipe.clip, pipe.mapper, "fp32", [1], {})
    save_generator(randomize(random_generator("tiny"), seed=7), tmp_path / "g")
    proc = run(["t2f-infer", "--generator", "g", "--clip", "tiny", "--mapper", "tiny", "--backend", "onnxruntime",
                "--artifacts", "a", "x"], tmp_path)
    assert proc.returncode == 1 and "exported from other models" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "faces.png").exists()


# ----------------------------------------------------------------------------
# GPU-path rules that the CPU can check: pure functions and our own control flow.


def test_precision_is_one_type():
    from t2f.precision import Precision

    assert Precision.parse("fp16") is Precision.FP16 and Precision.from_flag(False) is Precision.FP32
    assert (Precision.FP16.dtype, Precision.FP16.suffix, Precision.FP32.suffix) == (torch.float16, ".fp16", "")
    assert Precision.FP16 == "fp16" and f"{Precision.FP16}" == "fp16" and json.dumps({"p": Precision.FP16}) == '{"p": "fp16"}'
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Precision.FP16.check_device("cpu")
    with pytest.raises(ValueError, match="one of fp32, fp16"):
        Precision.parse("fp8")
    assert Precision.FP32.runs_on("cpu") and not Precision.FP16.runs_on("cpu")
    assert (Precision.BF16.dtype, Precision.BF16.suffix, Precision.BF16.onnx) == (torch.bfloat16, "", Precision.FP32)
    with pytest.raises(ValueError, match="bf16 is the CPU's reduced precision here; use fp16 on CUDA"):
        Precision.BF16.check_device("cuda")


def test_onnxruntime_providers_order_with_torch_and_trt_is_opt_in():
    from t2f.engine.backends import ort_providers
    from t2f.graphs import ModelDims
    from t2f.specs import graph_specs

    cuda = torch.device("cuda", 1)
    assert ort_providers("cuda", torch.device("cpu"), 0) == ["CPUExecutionProvider"]
    assert ort_providers("cuda", cuda, 1234) == [("CUDAExecutionProvider", {           # no TensorRT by default
        "device_id": "1", "user_compute_stream": "1234", "has_user_compute_stream": "1", "use_tf32": "0",
        "cudnn_conv_algo_search": "HEURISTIC"})]
    assert ort_providers("cuda", torch.device("cuda"), 1234, device_id=3)[0][1]["device_id"] == "3"   # plain cuda: the current one
    specs = graph_specs(ModelDims(16, 128, 16, 10, 32, 64, 3))
    spec = specs["mapper"]
    providers = ort_providers("tensorrt", cuda, 1234, spec, (1, 2, 8), "art/cache")
    assert [p for p, _ in providers] == ["TensorrtExecutionProvider"]          # no silent fallback to the CUDA provider
    trt = providers[0][1]
    assert trt["trt_fp16_enable"] == "False"
    # fp16 where the graph computes in fp16: the synthesis and text encoder of fp16 artifacts, never the mapper
    fp16 = {g: ort_providers("tensorrt", cuda, 1, specs[g], (1, 2, 8), "c", Precision.FP16)[0][1]["trt_fp16_enable"] for g in specs}
    assert fp16 == {"text_encoder": "True", "mapper": "False", "synthesis": "True"}
    assert trt["user_compute_stream"] == "1234" and trt["device_id"] == "1"
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == "art/cache"
    assert trt["trt_profile_min_shapes"] == "embedding:1x128,z:1x16,psi:1"
    assert trt["trt_profile_opt_shapes"] == "embedding:2x128,z:2x16,psi:2"
    assert trt["trt_profile_max_shapes"] == "embedding:8x128,z:8x16,psi:8"
    # No node of a TensorRT session may fall back to the CPU provider; the CUDA provider keeps ONNX Runtime's own
    # placement of shape arithmetic on the CPU (the option would refuse every exported graph); no spinning anywhere.
    from t2f.engine.backends import session_config

    assert session_config("tensorrt", cuda) == {"session.intra_op.allow_spinning": "0", "session.disable_cpu_ep_fallback": "1"}
    assert session_config("cuda", cuda) == session_config("cuda", CPU) == {"session.intra_op.allow_spinning": "0"}


def test_engine_profile_minimum_batch_is_padded():
    from t2f.engine.backends import pad_rows, runnable_batch

    assert runnable_batch(3, 1, 8) == 3 and runnable_batch(1, 4, 8) == 4 and runnable_batch(8, 4, 8) == 8
    with pytest.raises(ValueError, match="at most 8"):
        runnable_batch(9, 1, 8)
    t = torch.arange(6.0).reshape(2, 3)
    padded = pad_rows(t, 4)
    assert padded.shape == (4, 3) and torch.equal(padded[:2], t) and torch.equal(padded[2], t[1]) and torch.equal(padded[3], t[1])
    assert pad_rows(t, 2) is t


def test_a_refused_enqueue_raises():
    """Our control flow only, with a stand-in context object (no TensorRT ran): False from execute_async_v3 raises."""
    from t2f.engine.backends import enqueue

    class Context:
        def __init__(self, ok):
            self.ok, self.calls = ok, []

        def execute_async_v3(self, stream):
            self.calls.append(stream)
            return self.ok

    enqueue(ok := Context(True), 7, "mapper")
    assert ok.calls == [7]
    with pytest.raises(RuntimeError, match="could not enqueue the synthesis engine"):
        enqueue(Context(False), 7, "synthesis")


def test_backends_declare_what_they_can_do():
    from t2f.engine.backends import BACKEND_CLASSES
    from t2f.precision import Precision

    assert BACKEND_CLASSES["torch"].noise_modes == ("const", "random", "none")
    assert all(BACKEND_CLASSES[n].noise_modes == ("const",) for n in BACKEND_CLASSES if n != "torch")
    assert BACKEND_CLASSES["torch-cudagraph"].precisions == (Precision.FP16,)
    assert BACKEND_CLASSES["torch-cudagraph"].stage_timing == "eager" and BACKEND_CLASSES["onnxruntime"].stage_timing == "graph"
    for name in ("torch-cudagraph", "tensorrt", "onnxruntime-tensorrt"):
        with pytest.raises(BackendUnavailable, match="needs a CUDA device"):
            BACKEND_CLASSES[name].check_available(CPU, Precision.FP16 if name == "torch-cudagraph" else Precision.FP32)


def test_providers_are_checked_before_any_export(pipe, monkeypatch):
    """A backend that cannot run here is refused before minutes of ONNX export."""
    import t2f.engine.backends.ondemand as ondemand

    def no_export(*args, **kwargs):
        raise AssertionError("exported before checking the providers")

    monkeypatch.setattr(ondemand, "ensure_onnx", no_export)
    with pytest.raises(BackendUnavailable, match="needs a CUDA device"):
        make_backend("onnxruntime-tensorrt", models(pipe), CPU)


@pytest.mark.slow
@needs_onnxruntime
def test_device_auto_falls_back_to_the_cpu_with_a_note(pipe, monkeypatch):
    """--device auto on a GPU where the backend cannot run there (onnxruntime without a CUDA provider): the CPU, noted."""
    import t2f.engine.pipeline as pipeline
    from t2f.engine.pipeline import DeviceFallbackWarning

    real = pipeline.make_backend
    tried = []

    def make_backend_here(name, models, device, *args, **kwargs):
        tried.append(device.type)
        if device.type == "cuda":
            raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
        return real(name, models, device, *args, **kwargs)

    monkeypatch.setattr(pipeline, "resolve_device", lambda device: torch.device("cuda" if device == "auto" else device))
    monkeypatch.setattr(pipeline, "make_backend", make_backend_here)
    with pytest.warns(DeviceFallbackWarning, match="CUDAExecutionProvider.*running on the CPU instead"):
        fallback = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="auto", backend="onnxruntime")
    assert tried == ["cuda", "cpu"] and fallback.device.type == "cpu" and fallback.backend.name == "onnxruntime"
    with pytest.raises(BackendUnavailable):                  # a device asked for by name is not replaced
        monkeypatch.setattr(pipeline, "resolve_device", lambda device: torch.device("cuda"))
        TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cuda", backend="onnxruntime")


@pytest.mark.slow
@needs_onnxruntime
def test_bench_skips_a_failed_export_and_keeps_every_row(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import t2f.engine.bench as bench
    import t2f.export.onnx_export as onnx_export
    from t2f.graphs import ExportError

    def failed_export(*args, **kwargs):
        raise ExportError("cannot export synthesis.onnx: out of disk")

    monkeypatch.setattr(onnx_export, "export_artifacts", failed_export)
    args = ["--batches", "1", "--warmup", "0", "--iters", "2", "--backends", "onnxruntime,torch-cudagraph", "--device", "cpu",
            "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")]
    result = CliRunner().invoke(bench.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert [(r["backend"], r["batch"]) for r in report["results"]] == [("torch", 1)]
    reasons = {s["backend"]: s["reason"] for s in report["skipped"]}
    assert "out of disk" in reasons["onnxruntime"] and "needs a CUDA device" in reasons["torch-cudagraph"]
    stages = report["results"][0]["stages"]["end_to_end"]
    assert stages["samples"] == 2 and "p99_ms" not in stages and stages["max_ms"] >= stages["median_ms"]
    assert "median (max) ms over 2 interleaved rounds" in (tmp_path / "b.md").read_text()

    # Killed in the second round: the rows of the first round are on disk.
    real_measure, calls = bench.measure, []

    def measure_then_stop(*args, **kwargs):
        if len(calls) == 2 * bench.PROVISIONAL_CALLS + 2:  # two rows (torch, onnxruntime): their provisional calls, a round
            raise KeyboardInterrupt
        calls.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.undo()                                    # a real export this time
    monkeypatch.setattr(bench, "measure", measure_then_stop)
    (tmp_path / "b.json").unlink()
    CliRunner().invoke(bench.main, [a if a != "onnxruntime,torch-cudagraph" else "onnxruntime" for a in args])
    report = json.loads((tmp_path / "b.json").read_text())
    assert [(r["backend"], r["batch"]) for r in report["results"]] == [("torch", 1), ("onnxruntime", 1)]
    assert report["skipped"] == [] and all(r["stages"]["end_to_end"]["samples"] == 1 for r in report["results"])


# ----------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these with -m gpu).


@pytest.mark.gpu
@needs_onnxruntime
def test_device_auto_runs_onnxruntime_on_the_cpu_where_it_has_no_cuda_provider():
    """Defect 5 where it happens: a CUDA machine with the CPU-only onnxruntime."""
    import onnxruntime

    from t2f.engine.pipeline import DeviceFallbackWarning

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider: nothing to fall back from")
    base = tiny_pipeline(device="cpu")
    with pytest.warns(DeviceFallbackWarning, match="running on the CPU instead"):
        pipe = TextToFace(base.generator, base.clip, base.mapper, device="auto", backend="onnxruntime")
    assert pipe.device.type == "cpu"
    faces = pipe(["a smiling woman"], n=2, seed=1, truncation_psi=0.7)
    reference = base(["a smiling woman"], n=2, seed=1, truncation_psi=0.7)
    assert (faces.images.int() - reference.images.int()).abs().max() <= 1


@pytest.mark.gpu
def test_cudagraph_on_an_explicit_device_index_and_replays_match_eager_twins():
    """cuda:0 by index (the device guards), and the captured pipeline's ws equal its eager stages' ws exactly."""
    device = torch.device("cuda", 0)
    pipe = tiny_pipeline(device="cpu")
    graph = CudaGraphBackend(models(pipe), device, Precision.FP16)
    tokens, z, psi = (t.to(device) for t in inputs(pipe, 3))
    ws, image = graph.full(tokens, z, psi)
    eager_ws = graph.map(graph.encode(tokens), z, psi)
    assert torch.equal(ws, eager_ws)
    assert (image.int() - graph.synthesize(eager_ws).int()).abs().max() <= 1
    assert graph.stage_timing == "eager" and image.device == device


@pytest.mark.gpu
def test_fp16_eager_keeps_ws_in_fp32_on_cuda():
    eager, full, tokens, z, psi = on_cuda((TorchBackend, Precision.FP16), (TorchBackend, Precision.FP32))
    e = full.encode(tokens)
    assert torch.equal(eager.map(e, z, psi), full.map(e, z, psi))         # the mapper is fp32 in both
    ws = full.map(e, z, psi)
    a, b = full.synthesize_float(ws), eager.synthesize_float(ws)
    assert ((a - b).norm() / a.norm()).item() < 2e-2


# ----------------------------------------------------------------------------
# OpenVINO and bf16 on the CPU.


def _precisions_here():
    from t2f.precision import cpu_has_bf16

    return [Precision.FP32] + ([Precision.BF16] if cpu_has_bf16() else [])


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("precision", _precisions_here(), ids=str)
@needs_onnxruntime
def test_openvino_rows_are_bit_for_bit_across_blocks_and_match_eager(pipe, precision):
    ov = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", backend="openvino", precision=precision, batch_size=2)
    assert ov.backend.name == "openvino" and ov.precision is precision
    alone = ov._generate_rows([5], [1], [0.7], prompts=["a smiling woman"])
    five = ov._generate_rows([0, 5, 2, 3, 4], [0, 1, 0, 0, 2], [1.0, 0.7, 0.5, 0.9, 0.6],
                                prompts=["a child", "a smiling woman", "an old man", "b", "c"])
    assert torch.equal(five.images[1], alone.images[0]) and torch.equal(five.ws[1], alone.ws[0])
    assert not torch.equal(five.images[0], five.images[2])
    eager = pipe._generate_rows([0, 5, 2, 3, 4], [0, 1, 0, 0, 2], [1.0, 0.7, 0.5, 0.9, 0.6],
                                   prompts=["a child", "a smiling woman", "an old man", "b", "c"])
    diff = (five.images.int() - eager.images.int()).abs()
    if precision is Precision.FP32:                       # the same bounds as the export's parity table
        assert ((five.ws - eager.ws).norm() / eager.ws.norm()) < 1e-5 and diff.max() <= 1
    else:
        e = ov._text_conditions(["a child", "an old man"])
        cos = torch.nn.functional.cosine_similarity(e, pipe._text_conditions(["a child", "an old man"]), dim=-1)
        assert cos.min() >= 0.999 and diff.float().mean() <= 2.0 and 0 < diff.max()


@needs_openvino
@needs_onnxruntime
def test_openvino_compiles_with_its_cache_locked(pipe):
    """Two processes compiling one graph into a fresh cache race in OpenVINO's blob writer (one fails with 'cannot set
    permissions: No such file or directory'): each compile holds the cache's lock."""
    import fcntl

    from t2f.engine.backends.openvino_runtime import openvino_cache
    from t2f.private import LOCK_NAME

    backend = make_backend("openvino", models(pipe), CPU, Precision.FP32)
    locked = []

    class Watching:                                     # OpenVINO's Core, noting whether another open of the lock can take it
        def __init__(self, core):
            self.core = core

        def __getattr__(self, name):
            return getattr(self.core, name)

        def compile_model(self, *args):
            fd = os.open(openvino_cache() / LOCK_NAME, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked.append(False)
            except BlockingIOError:
                locked.append(True)
            finally:
                os.close(fd)
            return self.core.compile_model(*args)

    backend.core = Watching(backend.core)
    backend(*inputs(pipe, 2))
    assert locked == [True, True, True]                 # text encoder, mapper, synthesis: each compiled under the lock


@pytest.mark.slow
@needs_openvino
@needs_onnxruntime
def test_openvino_second_start_loads_its_compiled_graphs_from_the_cache(pipe):
    from t2f.engine.backends.openvino_runtime import openvino_cache

    from t2f.private import LOCK_NAME

    def files():                                    # every file but the lock's record of its last holder
        return {p.name: p.stat().st_mtime_ns for p in openvino_cache().iterdir() if p.name != LOCK_NAME}

    first = make_backend("openvino", models(pipe), CPU, Precision.FP32)
    first(*inputs(pipe, 2))
    blobs = files()
    assert len([b for b in blobs if b.endswith(".blob")]) >= 3           # one per graph at this block size
    second = make_backend("openvino", models(pipe), CPU, Precision.FP32)
    assert torch.equal(second(*inputs(pipe, 2)), first(*inputs(pipe, 2)))
    assert files() == blobs                                               # nothing compiled or written again


@pytest.mark.slow
@needs_openvino
@needs_onnxruntime
def test_a_graph_that_fails_its_bf16_parity_runs_fp32(pipe, tmp_path, monkeypatch):
    from t2f.export import onnx_export
    from t2f.precision import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    monkeypatch.setitem(onnx_export.BF16_BOUNDS, "text_encoder_cosine", 1.5)       # no embedding can pass
    manifest, rows = onnx_export.export_artifacts(tmp_path / "a", pipe.generator, pipe.clip, pipe.mapper, "bf16", [1], {})
    assert manifest.graph_precisions["bf16"] == {"text_encoder": "fp32", "mapper": "fp32", "synthesis": "bf16"}
    assert "no: runs fp32" in (tmp_path / "a" / "parity.md").read_text()
    backend = make_backend("openvino", models(pipe), CPU, Precision.BF16, artifacts=str(tmp_path / "a"))
    assert backend.graph_precisions == {"text_encoder": Precision.FP32, "mapper": Precision.FP32, "synthesis": Precision.BF16}
    ov = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", backend="openvino", precision="bf16",
                    artifacts=str(tmp_path / "a"))
    assert ov.summary == "openvino on cpu, bf16 (text_encoder fp32, mapper fp32)"
    e = ov._text_conditions(["a child"])
    assert ((e - pipe._text_conditions(["a child"])).norm() / e.norm()) < 1e-5        # the fp32 graph ran


def test_bf16_is_refused_with_one_line_where_the_cpu_lacks_it(monkeypatch, tmp_path):
    import t2f.precision

    monkeypatch.setattr(t2f.precision, "cpu_has_bf16", lambda: False)
    with pytest.raises(BackendUnavailable, match="bf16 needs a CPU with bfloat16 instructions"):
        choose(CPU, "torch", Precision.BF16)
    from click.testing import CliRunner

    from t2f.engine.cli import main as infer_main

    result = CliRunner().invoke(infer_main, [*TINY, "--precision", "bf16", "--device", "cpu", "a", "--out", str(tmp_path / "f.png")])
    assert result.exit_code == 2 and "bf16 needs a CPU with bfloat16 instructions" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "f.png").exists()


def test_random_noise_runs_whole_blocks_and_a_row_keeps_its_own_noise(pipe, monkeypatch):
    """noise_mode random: one synthesis call per block (not per image, not under a process-wide lock), and each row's
    noise comes from its own seed, so a row is the same alone or in a block."""
    from t2f.presets import random_generator

    g = randomize(random_generator("tiny"))          # noise strengths != 0, so the noise shows
    four = TextToFace(g, pipe.clip, pipe.mapper, device="cpu", backend="torch", batch_size=4)
    calls = []
    real = four.backend.synthesize
    monkeypatch.setattr(four.backend, "synthesize", lambda ws, **kw: calls.append(ws.shape[0]) or real(ws, **kw))
    rows = four._generate_rows([0, 5, 2, 3, 4], [0, 1, 0, 0, 2], [1.0] * 5, prompts=["a", "b", "c", "d", "e"], noise_mode="random")
    assert calls == [4, 4]
    alone = four._generate_rows([5], [1], [1.0], prompts=["b"], noise_mode="random")
    assert torch.equal(rows.images[1], alone.images[0])
    const = four._generate_rows([5], [1], [1.0], prompts=["b"])
    assert not torch.equal(const.images[0], alone.images[0])           # the noise is there


@pytest.mark.gpu
def test_cuda_numerics_are_pinned_and_rows_are_bit_for_bit():
    """True fp32 (no TF32) and deterministic cuDNN on CUDA: rows alone and in blocks equal, in fp32, fp16 and random
    noise; CUDA fp32 within fp32's bounds of the CPU."""
    cpu = tiny_pipeline(device="cpu")
    for precision in (Precision.FP32, Precision.FP16):
        gpu = TextToFace(cpu.generator, cpu.clip, cpu.mapper, device="cuda", backend="torch", precision=precision, batch_size=2)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        for noise in ("const", "random"):
            alone = gpu._generate_rows([5], [1], [0.7], prompts=["a smiling woman"], noise_mode=noise)
            five = gpu._generate_rows([0, 5, 2, 3, 4], [0, 1, 0, 0, 2], [1.0, 0.7, 0.5, 0.9, 0.6],
                                         prompts=["a child", "a smiling woman", "an old man", "b", "c"], noise_mode=noise)
            assert torch.equal(five.images[1], alone.images[0]) and torch.equal(five.ws[1], alone.ws[0]), (precision, noise)
            again = gpu._generate_rows([5], [1], [0.7], prompts=["a smiling woman"], noise_mode=noise)
            assert torch.equal(again.images, alone.images)
        if precision is Precision.FP32:
            ref = cpu._generate_rows([5], [1], [0.7], prompts=["a smiling woman"])
            assert ((alone.ws - ref.ws).norm() / ref.ws.norm()) < 1e-5
            assert (gpu._generate_rows([5], [1], [0.7], prompts=["a smiling woman"]).images.int() - ref.images.int()).abs().max() <= 1


@pytest.mark.slow
@needs_onnxruntime
def test_two_processes_exporting_into_the_cache_take_turns(pipe, tmp_path):
    """A second pipeline (t2f-serve's second model, say) waits for the first one's export into the cache, then reuses it."""
    import threading

    from t2f.engine.backends import onnx_cache_dir
    from t2f.private import directory_lock

    out = onnx_cache_dir(models(pipe))
    released = threading.Event()

    def hold():
        with directory_lock(out, "test"):
            released.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    threading.Timer(1.0, released.set).start()
    backend = make_backend("onnxruntime", models(pipe), CPU, Precision.FP32)   # waits, then exports
    holder.join()
    assert released.is_set() and backend.name == "onnxruntime"


@pytest.mark.slow
@needs_onnxruntime
def test_onnxruntime_errors_are_one_line_and_a_silent_provider_fallback_is_refused(pipe, monkeypatch):
    """ONNX Runtime's own exception types (not RuntimeError) become BackendUnavailable when a session is made (so
    --device auto falls back and t2f-bench skips the row) and RuntimeError when it runs; a session whose first
    provider is not the one asked for is refused."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail

    from t2f.engine.backends import check_first_provider

    class Session:
        def __init__(self, providers):
            self.providers = providers

        def get_providers(self):
            return self.providers

    check_first_provider(Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), "CUDAExecutionProvider", "x.onnx")
    with pytest.raises(BackendUnavailable, match="could not start TensorrtExecutionProvider.*fell back to CUDAExecutionProvider"):
        check_first_provider(Session(["CUDAExecutionProvider"]), "TensorrtExecutionProvider", "synthesis.onnx")

    backend = make_backend("onnxruntime", models(pipe), CPU, Precision.FP32)      # exported into the cache
    real = onnxruntime.InferenceSession

    def failing(*args, **kwargs):
        raise EPFail("the execution provider failed to initialize")

    monkeypatch.setattr(onnxruntime, "InferenceSession", failing)
    with pytest.raises(BackendUnavailable, match="text_encoder.onnx cannot be loaded by ONNX Runtime \\(EPFail\\)"):
        make_backend("onnxruntime", models(pipe), CPU, Precision.FP32)
    monkeypatch.setattr(onnxruntime, "InferenceSession", real)

    session = backend.sessions["mapper"]

    class Broken:
        def io_binding(self):
            return session.io_binding()

        def run_with_iobinding(self, binding):
            raise Fail("a node failed")

    backend.sessions["mapper"] = Broken()
    tokens, z, psi = inputs(pipe, 1)
    with pytest.raises(RuntimeError, match="ONNX Runtime failed running mapper: a node failed"):
        backend.map(backend.encode(tokens), z, psi)
