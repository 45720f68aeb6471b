"""The PyTorch backends' own rules, on the CPU where it can show them and on a GPU where only it can: a pipeline never
touches the caller's modules, channels_last is a real layout, and torch-compile's outputs survive later calls (CUDA
graph trees), with Inductor's cache directory set only while it compiles."""

import os
import weakref

import pytest
import torch

from helpers import randomize, tiny_pipeline
from t2f.clip import load_clip
from t2f.devices import placed
from t2f.engine.backends import (BackendUnavailable, CudaGraphBackend, Models, TorchBackend, TorchCompileBackend, choose,
                                 make_backend)
from t2f.engine.pipeline import TextToFace, sample_z
from t2f.graphs import SynthesisGraph
from t2f.precision import Precision
from t2f.presets import random_generator, random_mapper

CPU = torch.device("cpu")


def models(pipe):
    return Models(pipe.generator, pipe.clip, pipe.mapper)


def inputs(pipe, batch, device=CPU):
    prompts = ["a smiling woman", "an old man with white hair", "a child"] * batch
    tokens = pipe.clip.tokenize(prompts[:batch]).to(torch.int32)
    return tokens.to(device), sample_z(3, batch, 1, pipe.mapper.z_dim).to(device), torch.full([batch], 0.7, device=device)


def relative(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------
# The caller's modules are never touched.


def state(module: torch.nn.Module) -> dict:
    """Everything a pipeline could change in a module: training flags, and per tensor its device, dtype,
    requires_grad, storage, layout and values."""
    return dict(training=[m.training for m in module.modules()],
                tensors={name: (t.device, t.dtype, t.requires_grad, t.data_ptr(), t.stride(), t.detach().clone())
                         for name, t in [*module.named_parameters(), *module.named_buffers()]})


def assert_same_state(before: dict, after: dict):
    assert before["training"] == after["training"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (*meta, values) in before["tensors"].items():
        *now, now_values = after["tensors"][name]
        assert meta == now and torch.equal(values, now_values), name


def test_pipelines_and_backends_leave_the_callers_modules_as_they_were(monkeypatch):
    """Training mode, requires_grad, device, dtype, storage and values of the modules handed to a second pipeline
    (eager, channels_last, torch-compile; mode "image") are as they were, and the first pipeline's images too."""
    generator = randomize(random_generator("tiny")).train().requires_grad_(True)
    clip = load_clip("tiny")
    clip.model.train().requires_grad_(True)
    mapper = random_mapper(generator, clip.embed_dim).train().requires_grad_(True)
    first = TextToFace(generator, clip, mapper, device="cpu")
    expected = first(["a smiling woman"], n=2, seed=1)
    before = [state(m) for m in (generator, clip.model, mapper)]
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)        # construction only here
    for kwargs in (dict(), dict(memory_format="channels_last"), dict(backend="torch-compile")):
        second = TextToFace(generator, clip, mapper, device="cpu", **kwargs)
        second(["an old man"], seed=2)
        second(["a face"], mode="image", images=torch.zeros([1, 3, 32, 32]))
    assert second.backend.text.token_embedding.weight.data_ptr() != clip.model.token_embedding.weight.data_ptr()
    for b, module in zip(before, (generator, clip.model, mapper)):
        assert_same_state(b, state(module))
    again = first(["a smiling woman"], n=2, seed=1)
    assert torch.equal(again.images, expected.images) and torch.equal(again.ws, expected.ws)


def test_modules_are_copied_only_where_they_must_move():
    generator = random_generator("tiny")
    synthesis = generator.synthesis
    assert placed(synthesis, "cpu") is synthesis                                   # already there: shared, not copied
    moved = placed(synthesis, "meta")                                             # elsewhere: a copy moved there
    assert moved is not synthesis and next(moved.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for p in synthesis.parameters())
    clip = load_clip("tiny")
    assert clip.on("cpu") is clip
    meta = clip.on(torch.device("meta"))
    assert meta is not clip and meta.device.type == "meta" and clip.device.type == "cpu"
    assert meta.text_encoder.model is meta.model and meta.image_encoder.model is meta.model
    assert meta.name == clip.name and meta.embed_dim == clip.embed_dim


# ----------------------------------------------------------------------------
# channels_last.


def test_channels_last_gives_the_same_images_within_fp32_bounds(pipe):
    nchw = TorchBackend(models(pipe), CPU, Precision.FP32)
    nhwc = TorchBackend(models(pipe), CPU, Precision.FP32, memory_format="channels_last")
    assert (nchw.memory_format, nhwc.memory_format) == ("nchw", "channels_last")
    tokens, z, psi = inputs(pipe, 3)
    ws = nchw.map(nchw.encode(tokens), z, psi)
    assert torch.equal(nhwc.map(nhwc.encode(tokens), z, psi), ws)               # the layout is the synthesis' alone
    a, b = nchw.synthesize_float(ws), nhwc.synthesize_float(ws)
    assert b.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous(memory_format=torch.channels_last)
    assert relative(b, a) < 1e-5
    assert (nhwc.synthesize(ws).int() - nchw.synthesize(ws).int()).abs().max() <= 1
    # The module torch-cudagraph captures and torch-compile compiles: folded weights and activations NHWC, same values.
    graph = SynthesisGraph(pipe.generator, Precision.FP32, uint8=False, memory_format=torch.channels_last)
    assert graph.synthesis.b8.conv1.folded_conv.is_contiguous(memory_format=torch.channels_last)
    assert relative(graph(ws), SynthesisGraph(pipe.generator, Precision.FP32, uint8=False)(ws)) < 1e-5
    # Through the pipeline, and refused with one line where a backend runs NCHW only.
    cl = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", memory_format="channels_last", batch_size=pipe.batch_size)
    faces, reference = cl(["a smiling woman"], n=2, seed=4), pipe(["a smiling woman"], n=2, seed=4)
    assert torch.equal(faces.ws, reference.ws) and (faces.images.int() - reference.images.int()).abs().max() <= 1
    assert choose(CPU, memory_format="channels_last") == (TorchBackend, Precision.FP32)
    with pytest.raises(BackendUnavailable, match="onnxruntime runs the synthesis in nchw only, not channels_last"):
        make_backend("onnxruntime", models(pipe), CPU, Precision.FP32, memory_format="channels_last")
    with pytest.raises(ValueError, match="memory_format must be one of nchw, channels_last"):
        TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", memory_format="nhwc")


# ----------------------------------------------------------------------------
# torch-compile: one function for the whole pipeline, outputs cloned, the cache directory scoped.


class CudaGraphTrees:
    """A torch.compile stand-in that treats outputs as CUDA graph trees do: each compiled function writes its outputs
    into static buffers of its own, and every compiled call frees the previous call's outputs (here: overwrites them
    with NaN, or 0 for integers). It records what was compiled, what each call saw of Inductor's environment, and
    weak references to what it returned."""

    def __init__(self):
        self.compiled, self.environ, self.returned, self.live = [], [], [], []

    def __call__(self, module, **options):
        self.compiled.append((module, options))
        buffers = {}

        def compiled(*inputs):
            self.environ.append({name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")})
            shapes = tuple(i.shape for i in inputs)
            if shapes not in buffers and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):       # compiles: as Inductor does
                os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton"))
            for t in self.live:
                t.fill_(float("nan") if t.is_floating_point() else 0)
            out = module(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            static = buffers.setdefault(shapes, [torch.empty_like(o) for o in outs])
            for buffer, o in zip(static, outs):
                buffer.copy_(o)
            self.live = static
            views = [buffer.view(buffer.shape) for buffer in static]
            self.returned = [weakref.ref(v) for v in views]
            return tuple(views) if isinstance(out, tuple) else views[0]

        return compiled


def test_torch_compile_runs_one_function_for_the_pipeline_and_its_outputs_survive_later_calls(pipe, monkeypatch, tmp_path):
    """The CPU's path is CUDA's with CUDA graphs off: here a stand-in for torch.compile frees each call's outputs at
    the next call, as CUDA graph trees do. full() is one compiled call of the whole pipeline module; encode, map and
    synthesize feed each other; results kept from earlier calls stay intact; the originals are not kept."""
    trees = CudaGraphTrees()
    monkeypatch.setattr(torch, "compile", trees)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    backend = make_backend("torch-compile", models(pipe), CPU, Precision.FP32)
    assert isinstance(backend, TorchCompileBackend)
    assert trees.compiled[0] == (backend.pipeline, dict(dynamic=False, fullgraph=True, mode=None))   # CUDA: "reduce-overhead"
    assert [m for m, _ in trees.compiled[1:]] == [backend.text, backend.mapper, backend.synthesis]
    tokens, z, psi = inputs(pipe, 3)
    with torch.no_grad():
        ws_eager, image_eager = backend.pipeline(tokens, z, psi)
    ws, image = backend.full(tokens, z, psi)
    assert len(trees.environ) == 1 and all(r() is None for r in trees.returned)             # one call; originals dropped
    chained = backend.synthesize(backend.map(backend.encode(tokens), z, psi))
    again = backend.full(tokens[:1], z[:1], psi[:1])
    assert torch.equal(ws, ws_eager) and torch.equal(image, image_eager) and torch.equal(chained, image_eager)
    assert (again[1].int() - image_eager[:1].int()).abs().max() <= 1                     # one row alone: rounding only
    # Inductor's cache directory: in the environment while a call may compile (the first at each shape), then gone.
    assert [e["TORCHINDUCTOR_CACHE_DIR"] for e in trees.environ] == [backend.cache] * 5
    backend.full(tokens, z, psi)
    assert trees.environ[-1] == dict(TORCHINDUCTOR_CACHE_DIR=None, TRITON_CACHE_DIR=None)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and "TRITON_CACHE_DIR" not in os.environ
    assert backend.cache.startswith(os.environ["T2F_CACHE"])
    # The user's own directory is Inductor's (and stays theirs); the pipeline's text and KNN paths through the trees.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiled = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", backend="torch-compile", batch_size=2)
    assert compiled.backend.cache == str(tmp_path / "mine")
    text, eager = compiled(["a smiling woman", "a child"], n=2, seed=3), pipe(["a smiling woman", "a child"], n=2, seed=3)
    knn = compiled._generate(pipe._text_conditions(["a child"]), ["a child"], n=3, seed=1)          # map -> synthesize
    knn_eager = pipe._generate(pipe._text_conditions(["a child"]), ["a child"], n=3, seed=1)
    for faces, reference in ((text, eager), (knn, knn_eager)):                       # other blocks: rounding only
        assert relative(faces.ws, reference.ws) < 1e-5 and (faces.images.int() - reference.images.int()).abs().max() <= 1
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine") and "TRITON_CACHE_DIR" not in os.environ


@pytest.mark.slow
def test_torch_compile_rows_are_bit_for_bit_across_blocks_and_match_eager(pipe, monkeypatch):
    """Inductor on the CPU (a C++ compiler is needed): the whole pipeline, then encode -> map -> synthesize, compiled
    once per block size (tens of seconds each)."""
    try:
        TorchCompileBackend.check_available(CPU, Precision.FP32)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    import torch._dynamo  # noqa: F401  (importing it writes Inductor's default directory into the environment)

    environ = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    compiled = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", backend="torch-compile", batch_size=2)
    alone = compiled._generate_rows([5], [1], [0.7], prompts=["a smiling woman"])
    three = compiled._generate_rows([0, 5, 2], [0, 1, 0], [1.0, 0.7, 0.5], prompts=["a child", "a smiling woman", "an old man"])
    assert torch.equal(three.images[1], alone.images[0]) and torch.equal(three.ws[1], alone.ws[0])
    eager = pipe._generate_rows([0, 5, 2], [0, 1, 0], [1.0, 0.7, 0.5], prompts=["a child", "a smiling woman", "an old man"])
    assert relative(three.ws, eager.ws) < 1e-5 and (three.images.int() - eager.images.int()).abs().max() <= 1
    backend = compiled.backend
    tokens, z, psi = inputs(pipe, 2)
    ws, image = backend.full(tokens, z, psi)
    chained = backend.synthesize(backend.map(backend.encode(tokens), z, psi))
    assert (chained.int() - image.int()).abs().max() <= 1
    cache = backend.cache                                               # Inductor's cache is in t2f's cache directory
    assert cache.startswith(os.environ["T2F_CACHE"]) and os.listdir(cache)
    assert {name: os.environ.get(name) for name in environ} == environ                 # the environment as it was


# ----------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these with -m gpu).


@pytest.mark.gpu
def test_a_cuda_pipeline_leaves_a_cpu_pipelines_modules_on_the_cpu():
    cpu = tiny_pipeline(device="cpu")
    expected = cpu(["a smiling woman"], n=2, seed=1)
    before = [state(m) for m in (cpu.generator, cpu.clip.model, cpu.mapper)]
    for backend, precision in (("torch", "fp32"), ("torch", "fp16"), ("torch-cudagraph", "fp16")):
        gpu = TextToFace(cpu.generator, cpu.clip, cpu.mapper, device="cuda", backend=backend, precision=precision, batch_size=2)
        faces = gpu(["a smiling woman"], n=2, seed=1)
        gpu(["a face"], mode="image", images=torch.zeros([1, 3, 32, 32]))
        assert (faces.images.int() - expected.images.int()).abs().float().mean() < 2.0
    for b, module in zip(before, (cpu.generator, cpu.clip.model, cpu.mapper)):
        assert_same_state(b, state(module))
    assert torch.equal(cpu(["a smiling woman"], n=2, seed=1).images, expected.images)


@pytest.mark.gpu
def test_channels_last_on_cuda_matches_nchw():
    pipe = tiny_pipeline(device="cpu")
    device = torch.device("cuda")
    tokens, z, psi = inputs(pipe, 2, device)
    for cls in (TorchBackend, CudaGraphBackend):
        nchw = cls(models(pipe), device, Precision.FP16)
        nhwc = cls(models(pipe), device, Precision.FP16, memory_format="channels_last")
        a, b = nchw.full(tokens, z, psi), nhwc.full(tokens, z, psi)
        assert torch.equal(a[0], b[0]), cls.name
        assert (a[1].float() - b[1].float()).abs().mean() < 1.0, cls.name


@pytest.mark.gpu
def test_torch_compile_on_cuda_at_two_batch_sizes_matches_eager_and_keeps_its_results():
    """CUDA graph trees (mode "reduce-overhead"): full() at two batch sizes, then encode -> map -> synthesize feeding
    each other (at the first batch size: Triton's kernel cache serves most of their kernels); each result within fp16's
    bounds of eager fp16 and untouched by the calls after it. The last test here: it compiles five graphs."""
    pipe = tiny_pipeline(device="cpu")
    device = torch.device("cuda")
    compiled = TorchCompileBackend(models(pipe), device, Precision.FP16)
    eager = TorchBackend(models(pipe), device, Precision.FP16)
    kept = []
    for batch in (1, 3, 1):
        tokens, z, psi = inputs(pipe, batch, device)
        ws, image = compiled.full(tokens, z, psi)
        reference_ws = eager.map(eager.encode(tokens), z, psi)
        assert relative(ws, reference_ws) < 2e-2
        assert (image.float() - eager.synthesize(reference_ws).float()).abs().mean() < 2.0
        kept.append((ws, image, ws.clone(), image.clone()))
    tokens, z, psi = inputs(pipe, 1, device)
    chained = compiled.synthesize(compiled.map(compiled.encode(tokens), z, psi))
    assert (chained.int() - kept[0][1].int()).abs().max() <= 1
    for ws, image, ws_copy, image_copy in kept:                          # later calls did not overwrite them
        assert torch.equal(ws, ws_copy) and torch.equal(image, image_copy)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ or os.environ["TORCHINDUCTOR_CACHE_DIR"] != compiled.cache


def test_only_torch_cudagraph_makes_example_tokens(pipe, monkeypatch):
    """The capture's example row is made by the one backend that captures (construction only here: nothing runs)."""
    import t2f.engine.backends.pytorch as pytorch

    made = []
    real = pytorch.example_tokens
    monkeypatch.setattr(pytorch, "example_tokens", lambda *args: made.append(args) or real(*args))
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    for cls in (TorchBackend, TorchCompileBackend):
        cls(models(pipe), torch.device("cpu"), Precision.FP32)
    assert made == []
    backend = CudaGraphBackend(models(pipe), torch.device("cpu"), Precision.FP16)
    assert len(made) == 1 and backend._example_row.shape == (1, pipe.clip.context_length)
