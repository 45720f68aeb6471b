"""Backends: one call shape for every way of running the three graphs.

    encode(tokens [B, context] int32)                  -> embedding [B, D] float32
    map(embedding [B, D], z [B, z_dim], psi [B])       -> ws [B, num_ws, w_dim] float32
    synthesize(ws [B, num_ws, w_dim])                  -> image [B, H, W, C] uint8
    __call__(tokens, z, psi)                           -> image, the three in a row

Torch tensors in, torch tensors out, on the backend's device. Backends other than `torch`
allocate their input and output buffers once per batch size and return those buffers:
a result is valid until the next call with the same batch size (copy it to keep it).

    torch                  eager PyTorch, fp32 or fp16 (CUDA); every noise mode
    torch-cudagraph        fp16, the whole tokens -> uint8 image pipeline captured as one CUDA graph per batch size
    onnxruntime            the exported ONNX graphs; the CUDA execution provider on a GPU (onnxruntime-gpu), else
                           the CPU; IO binding onto the torch tensors, ordered with torch's stream
    onnxruntime-tensorrt   the same with ONNX Runtime's TensorRT execution provider (opt-in): explicit profile shapes,
                           engine and timing caches in the artifact directory
    tensorrt               the exported TensorRT engines, execute_async_v3 on torch tensors, one stream, one shared
                           scratch buffer, the three engines captured as one CUDA graph per batch size

Each backend class declares what it can do (`precisions`, `noise_modes`, `stage_timing`,
`separate_uint8`); callers ask it, they never test its type.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from t2f.clip import Clip
from t2f.graphs import GRAPHS, ExportError, GraphSpec, artifact_name, MapperGraph, ModelDims, SynthesisGraph, TextEncoderGraph, graph_specs
from t2f.mapper import Mapper
from t2f.precision import Precision
from t2f.stylegan2 import NOISE_MODES, Generator, to_uint8


class BackendUnavailable(Exception):
    """A backend that cannot run here (missing library, GPU or artifacts)."""


class Backend:
    name = "base"
    precisions: tuple[Precision, ...] = (Precision.FP32, Precision.FP16)
    noise_modes: tuple[str, ...] = ("const",)      # exported graphs hold constant noise
    stage_timing = "graph"          # what t2f-bench's per-stage columns time: "graph" (each stage's own graph or
                                    # eager module, as `full` runs it) or "eager" (eager twins of a captured pipeline)
    separate_uint8 = False          # True: synthesize_float(ws) + to_uint8 are separate steps (eager PyTorch)
    needs_cuda = False
    uses_artifacts = False          # runs exported graphs (constructed from an artifact directory)
    exports_on_demand = False       # exports its ONNX graphs into the cache when no artifacts are given
    max_batch = 1 << 30             # largest batch one call takes (engines have a profile)

    def __init__(self, device: torch.device, precision: Precision):
        self.device, self.precision = device, Precision.parse(precision)

    @classmethod
    def check_available(cls, device: torch.device, precision: Precision) -> None:
        """BackendUnavailable, before any work, where this backend cannot run on `device` in `precision`."""
        precision = Precision.parse(precision)
        if cls.needs_cuda and device.type != "cuda":
            raise BackendUnavailable(f"{cls.name} needs a CUDA device")
        if precision not in cls.precisions:
            raise BackendUnavailable(f"{cls.name} runs in {' or '.join(map(str, cls.precisions))}; pass --precision {cls.precisions[0]}")
        try:
            precision.check_device(device)
        except ValueError as e:
            raise BackendUnavailable(str(e)) from None

    def __call__(self, tokens: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.full(tokens, z, psi)[1]

    def full(self, tokens: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws, image) of the whole pipeline; backends with a CUDA graph replay it here."""
        ws = self.map(self.encode(tokens), z, psi)
        return ws, self.synthesize(ws)


# ----------------------------------------------------------------------------
# PyTorch.


class TorchBackend(Backend):
    """Eager PyTorch: open_clip's text encoder, the mapper, the synthesis network, then the uint8 conversion."""

    name = "torch"
    noise_modes = NOISE_MODES
    separate_uint8 = True

    def __init__(self, generator: Generator, clip: Clip, mapper: Mapper, device: torch.device, precision: Precision = Precision.FP32):
        self.check_available(device, precision)
        super().__init__(device, precision)
        self.clip = clip.to(device)
        self.mapper = MapperGraph(mapper, generator.w_avg).to(device)
        self.synthesis = generator.synthesis.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, tokens):
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.precision.half):
            return self.clip.text_encoder(tokens.to(self.device, torch.long)).float()

    @torch.no_grad()
    def map(self, embedding, z, psi):
        return self.mapper(embedding.to(self.device), z.to(self.device), psi.to(self.device))

    @torch.no_grad()
    def synthesize_float(self, ws, noise_mode: str = "const"):
        return self.synthesis(ws.to(self.device), noise_mode=noise_mode, precision=self.precision)

    @torch.no_grad()
    def synthesize(self, ws, noise_mode: str = "const"):
        return to_uint8(self.synthesize_float(ws, noise_mode))


class CudaGraphBackend(Backend):
    """fp16; tokens -> uint8 image captured as one CUDA graph per batch size (launch overhead gone).

    `encode`, `map` and `synthesize` run the same modules eagerly (stage_timing "eager"); `full` replays the graph.
    """

    name = "torch-cudagraph"
    precisions = (Precision.FP16,)
    stage_timing = "eager"
    needs_cuda = True

    def __init__(self, generator: Generator, clip: Clip, mapper: Mapper, device: torch.device, precision: Precision = Precision.FP16):
        self.check_available(device, precision)
        super().__init__(device, precision)
        self.text = TextEncoderGraph(clip.model, Precision.FP16).to(device)
        self.mapper = MapperGraph(mapper, generator.w_avg).to(device)
        self.synthesis = SynthesisGraph(generator, Precision.FP16).to(device)
        self.context, self.z_dim = clip.context_length, mapper.z_dim
        self.graphs: dict[int, tuple] = {}

    def _pipeline(self, tokens, z, psi):
        embedding = self.text(tokens)
        ws = self.mapper(embedding, z, psi)
        return embedding, ws, self.synthesis(ws)

    @torch.no_grad()
    def _graph(self, batch: int):
        if batch not in self.graphs:
            with torch.cuda.device(self.device):                # capture streams and pools belong to self.device
                tokens = torch.zeros([batch, self.context], dtype=torch.int32, device=self.device)
                tokens[:, 1] = 1   # any valid row: the end-of-text position is where the largest id is
                z = torch.zeros([batch, self.z_dim], device=self.device)
                psi = torch.ones([batch], device=self.device)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):                  # warm-up: kernels chosen, allocator primed
                        self._pipeline(tokens, z, psi)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = self._pipeline(tokens, z, psi)
            self.graphs[batch] = (graph, (tokens, z, psi), outputs)
        return self.graphs[batch]

    def full(self, tokens, z, psi):
        graph, inputs, (_, ws, image) = self._graph(tokens.shape[0])
        for buffer, value in zip(inputs, (tokens, z, psi)):
            buffer.copy_(value, non_blocking=True)
        with torch.cuda.device(self.device):
            graph.replay()
        return ws, image

    @torch.no_grad()
    def encode(self, tokens):
        return self.text(tokens.to(self.device, torch.int32))

    @torch.no_grad()
    def map(self, embedding, z, psi):
        return self.mapper(embedding.to(self.device), z.to(self.device), psi.to(self.device))

    @torch.no_grad()
    def synthesize(self, ws):
        return self.synthesis(ws.to(self.device))


# ----------------------------------------------------------------------------
# Exported artifacts.


class _ArtifactBackend(Backend):
    """Runs exported graphs by spec: subclasses implement _run(spec, feeds) -> output tensor."""

    specs: dict[str, GraphSpec]

    def encode(self, tokens):
        return self._run(self.specs["text_encoder"], {"tokens": tokens.to(torch.int32)})

    def map(self, embedding, z, psi):
        return self._run(self.specs["mapper"], {"embedding": embedding.float(), "z": z.float(), "psi": psi.float()})

    def synthesize(self, ws):
        return self._run(self.specs["synthesis"], {"ws": ws.float()})


def artifact_manifest(check, artifacts: Path, models: tuple, precision: Precision) -> dict:
    """The checked manifest of `artifacts` for these models; BackendUnavailable saying what differs otherwise."""
    try:
        return check(artifacts, *models, precision)
    except ExportError as e:
        raise BackendUnavailable(str(e)) from None


_NUMPY_TYPES = {torch.float32: "float32", torch.int32: "int32", torch.uint8: "uint8", torch.float16: "float16"}
ORT_CACHE = "onnxruntime-tensorrt"              # engine and timing caches of ONNX Runtime's TensorRT provider
DEFAULT_PROFILE = (1, 1, 32)                    # ONNX Runtime's TensorRT profile when the export recorded none


def _shapes(profile: dict[str, tuple], which: int) -> str:
    """ONNX Runtime's TensorRT profile syntax: "tokens:1x77,psi:1"."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def ort_providers(provider: str, device: torch.device, stream: int, spec: GraphSpec | None = None,
                  batch: tuple[int, int, int] = DEFAULT_PROFILE, cache: Path | None = None) -> list:
    """The execution providers of one graph's session (a pure function of its arguments).

    CPU: the CPU provider. CUDA: the CUDA provider on `device` with `stream` (a non-default torch stream; ONNX Runtime
    treats 0 as "none") as its compute stream, so the backend can order ONNX Runtime's work with torch's. With
    provider "tensorrt", ONNX Runtime's TensorRT provider first (same device and stream), with the spec's profile
    for `batch` and its engine and timing caches in `cache`, so engines are built once, not in every process.
    """
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    common = {"device_id": str(device.index or 0), "user_compute_stream": str(stream), "has_user_compute_stream": "1"}
    providers = [("CUDAExecutionProvider", dict(common))]
    if provider == "tensorrt":
        profile = spec.profile(batch)
        options = dict(common, trt_engine_cache_enable="True", trt_engine_cache_path=str(cache),
                       trt_timing_cache_enable="True", trt_timing_cache_path=str(cache),
                       trt_profile_min_shapes=_shapes(profile, 0), trt_profile_opt_shapes=_shapes(profile, 1),
                       trt_profile_max_shapes=_shapes(profile, 2))
        providers.insert(0, ("TensorrtExecutionProvider", options))
    return providers


class OnnxRuntimeBackend(_ArtifactBackend):
    """The exported ONNX graphs in ONNX Runtime (CUDA provider on a GPU, else CPU), with IO binding onto torch tensors."""

    name = "onnxruntime"
    uses_artifacts = exports_on_demand = True
    provider = "cuda"                   # on a GPU: the CUDA execution provider

    @classmethod
    def check_available(cls, device: torch.device, precision: Precision) -> None:
        super().check_available(device, precision)
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime or onnxruntime-gpu)")
        if device.type == "cuda":
            import onnxruntime

            wanted = "TensorrtExecutionProvider" if cls.provider == "tensorrt" else "CUDAExecutionProvider"
            if wanted not in onnxruntime.get_available_providers():
                raise BackendUnavailable(f"onnxruntime has no {wanted} here (install onnxruntime-gpu"
                                         f"{' and TensorRT' if cls.provider == 'tensorrt' else ''})")

    def __init__(self, artifacts: str | os.PathLike, device: torch.device, models: tuple, precision: Precision = Precision.FP32):
        self.check_available(device, precision)
        import onnxruntime

        from t2f.export.onnx_export import check_artifacts, onnx_session

        super().__init__(device, precision)
        artifacts = Path(artifacts)
        manifest = artifact_manifest(check_artifacts, artifacts, models, self.precision)
        self.specs = graph_specs(ModelDims.from_manifest(manifest["models"]))
        options = onnxruntime.SessionOptions()
        # No busy-waiting between runs: spinning threads steal the cores the next stage needs (measured on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        batch = tuple(manifest.get("batch_profile") or DEFAULT_PROFILE)
        if self.provider == "tensorrt":
            (artifacts / ORT_CACHE).mkdir(exist_ok=True)
        self.sessions = {}
        for graph, spec in self.specs.items():
            name = spec.file_name(self.precision)
            onnx_session(artifacts / name, manifest["onnx"][name]["sha256"])         # checksum and loadability
            providers = ort_providers(self.provider, device, self.stream.cuda_stream if self.stream else 0, spec, batch,
                                      artifacts / ORT_CACHE)
            self.sessions[graph] = onnxruntime.InferenceSession(str(artifacts / name), options, providers=providers)
        self.outputs: dict[tuple, torch.Tensor] = {}

    def _run(self, spec: GraphSpec, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        session = self.sessions[spec.name]
        binding = session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, tensor in feeds.items():
            tensor = tensor.to(self.device).contiguous()
            feeds[name] = tensor                                          # keep it alive until run returns
            binding.bind_input(name, kind, index, _NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        batch = next(iter(feeds.values())).shape[0]
        key = (spec.name, batch)
        if key not in self.outputs:                                       # allocated once per batch size
            self.outputs[key] = torch.empty(spec.output_shape(batch), dtype=spec.output.dtype, device=self.device)
        out = self.outputs[key]
        binding.bind_output(spec.output.name, kind, index, _NUMPY_TYPES[out.dtype], list(out.shape), out.data_ptr())
        if self.stream is None:
            session.run_with_iobinding(binding)
            return out
        # ONNX Runtime works on self.stream: it starts after torch's queued work (the inputs just written), and
        # torch's later work waits for it. synchronize_inputs() alone does not order this for every provider.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        session.run_with_iobinding(binding)
        current.wait_stream(self.stream)
        return out


class OnnxRuntimeTensorRTBackend(OnnxRuntimeBackend):
    """ONNX Runtime with its TensorRT execution provider (opt-in): profiles from the export, caches in the artifacts."""

    name = "onnxruntime-tensorrt"
    provider = "tensorrt"
    needs_cuda = True


# ----------------------------------------------------------------------------
# TensorRT (not run by us: TensorRT cannot be installed on our machines).


def runnable_batch(batch: int, min_batch: int, max_batch: int) -> int:
    """The batch an engine runs for `batch` rows: padded up to its profile's minimum; ValueError above its maximum."""
    if batch > max_batch:
        raise ValueError(f"batch {batch} is above the engines' profile (at most {max_batch}); re-export with a larger --batch")
    return max(batch, min_batch)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows (a batch below an engine profile's minimum)."""
    missing = rows - tensor.shape[0]
    return tensor if missing <= 0 else torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def enqueue(context, stream: int, graph: str) -> None:
    """execute_async_v3, raising when TensorRT refuses to enqueue (it returns False, it does not raise)."""
    if not context.execute_async_v3(stream):
        raise RuntimeError(f"TensorRT could not enqueue the {graph} engine")


class TensorRTBackend(_ArtifactBackend):
    """The exported TensorRT engines: execute_async_v3 with set_tensor_address on torch tensors, one stream.

    All execution contexts share one device scratch buffer (user-managed context memory): they run one
    after another on one stream, so one buffer of the largest engine's size serves them all.
    """

    name = "tensorrt"
    needs_cuda = True
    uses_artifacts = True

    def __init__(self, artifacts: str | os.PathLike, device: torch.device, models: tuple, precision: Precision = Precision.FP16,
                 cuda_graph: bool = True):
        from t2f.export.onnx_export import check_artifacts
        from t2f.export.tensorrt import load_engine, tensorrt_module
        from t2f.io import sha256_file

        self.check_available(device, precision)
        super().__init__(device, precision)
        artifacts = Path(artifacts)
        manifest = artifact_manifest(check_artifacts, artifacts, models, self.precision)
        self.specs = graph_specs(ModelDims.from_manifest(manifest["models"]))
        records = (manifest.get("tensorrt") or {}).get("engines", {})
        self.engines, self.min_batch = {}, 1
        with torch.cuda.device(device):
            for graph, spec in self.specs.items():
                plan, onnx = artifacts / spec.file_name(self.precision, "plan"), spec.file_name(self.precision)
                record = records.get(plan.name)
                if (not record or not plan.is_file() or record.get("sha256") != sha256_file(plan)
                        or record["record"].get("onnx_sha256") != manifest["onnx"][onnx]["sha256"]):
                    raise BackendUnavailable(f"{plan} is missing, changed, or built from another {onnx}; run t2f-export --out {artifacts} again")
                try:
                    self.engines[graph] = load_engine(plan, manifest, device)
                except (ExportError, OSError) as e:
                    raise BackendUnavailable(str(e)) from None
                profiles = record["record"]["profiles"].values()
                self.max_batch = min(self.max_batch, *(shapes[2][0] for shapes in profiles))
                self.min_batch = max(self.min_batch, *(shapes[0][0] for shapes in profiles))
            self.trt = tensorrt_module()
            sizes = [getattr(e, "device_memory_size_v2", None) or e.device_memory_size for e in self.engines.values()]
            self.scratch = torch.empty([max(sizes + [1])], dtype=torch.uint8, device=device)   # 512-byte aligned
            self.stream = torch.cuda.Stream(device)
            self.contexts = self._contexts()
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.cuda_graph, self.graphs = cuda_graph, {}

    def _contexts(self) -> dict:
        """One execution context per engine, on the shared scratch buffer."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        contexts = {}
        for graph, engine in self.engines.items():
            if strategy is None:                                    # TensorRT before 10.0: contexts own their memory
                contexts[graph] = engine.create_execution_context()
                continue
            context = engine.create_execution_context(strategy.USER_MANAGED)
            if hasattr(context, "set_device_memory"):               # TensorRT >= 10.1
                context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            else:
                context.device_memory = self.scratch.data_ptr()
            contexts[graph] = context
        return contexts

    def full(self, tokens, z, psi):
        """The three engines in a row; with cuda_graph, their launches are captured once per batch size and replayed,
        each batch size with execution contexts of its own (a captured graph keeps its context's shapes)."""
        if not self.cuda_graph:
            return super().full(tokens, z, psi)
        batch = tokens.shape[0]
        rows = runnable_batch(batch, self.min_batch, self.max_batch)
        if rows not in self.graphs:
            self.graphs[rows] = self._capture(pad_rows(tokens, rows), pad_rows(z, rows), pad_rows(psi, rows))
        graph, static, ws, image = self.graphs[rows]
        for buffer, value in zip(static, (tokens, z, psi)):
            buffer[:batch].copy_(value, non_blocking=True)
        with torch.cuda.device(self.device):
            graph.replay()                                       # on the current stream, after the copies
        return ws[:batch], image[:batch]

    @torch.no_grad()
    def _capture(self, tokens, z, psi) -> tuple:
        """Run the three engines once un-captured, capture their launches, and check the first replay against that run."""
        with torch.cuda.device(self.device):
            contexts = self._contexts()
            static = (tokens.to(self.device, torch.int32).clone(), z.to(self.device).float().clone(), psi.to(self.device).float().clone())
            e = self._run(self.specs["text_encoder"], {"tokens": static[0]}, contexts)
            ws = self._run(self.specs["mapper"], {"embedding": e, "z": static[1], "psi": static[2]}, contexts)
            image = self._run(self.specs["synthesis"], {"ws": ws}, contexts)
            expected = (ws.clone(), image.clone())
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # The un-captured run bound every tensor address (static inputs, this batch's outputs); capture the launches.
            with torch.cuda.graph(graph, stream=self.stream):
                for name in GRAPHS:
                    enqueue(contexts[name], self.stream.cuda_stream, name)
            graph.replay()
            torch.cuda.synchronize(self.device)
            if not (torch.equal(ws, expected[0]) and torch.equal(image, expected[1])):
                raise RuntimeError("the captured TensorRT engines do not reproduce their un-captured run; "
                                   "use the tensorrt backend without CUDA graphs (cuda_graph=False)")
        self._graph_contexts = getattr(self, "_graph_contexts", []) + [contexts]      # keep them alive with the graph
        return graph, static, ws, image

    def _run(self, spec: GraphSpec, feeds: dict[str, torch.Tensor], contexts=None) -> torch.Tensor:
        context = (contexts or self.contexts)[spec.name]
        batch = next(iter(feeds.values())).shape[0]
        rows = runnable_batch(batch, self.min_batch, self.max_batch)
        with torch.cuda.device(self.device):
            for name, tensor in feeds.items():
                tensor = pad_rows(tensor.to(self.device), rows).contiguous()
                feeds[name] = tensor
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(f"{name} {tuple(tensor.shape)} is outside the {spec.name} engine's profile "
                                     f"(batch {self.min_batch} to {self.max_batch}); re-export with another --batch")
                context.set_tensor_address(name, tensor.data_ptr())
            key = (spec.name, rows, id(context))
            if key not in self.outputs:
                self.outputs[key] = torch.empty(spec.output_shape(rows), dtype=spec.output.dtype, device=self.device)
            out = self.outputs[key]
            context.set_tensor_address(spec.output.name, out.data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            enqueue(context, self.stream.cuda_stream, spec.name)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out[:batch]


# ----------------------------------------------------------------------------
# Choosing and building a backend.


BACKEND_CLASSES: dict[str, type[Backend]] = {cls.name: cls for cls in (
    TorchBackend, CudaGraphBackend, OnnxRuntimeBackend, OnnxRuntimeTensorRTBackend, TensorRTBackend)}
BACKENDS = tuple(BACKEND_CLASSES)


def onnx_cache_dir(generator: Generator, clip: Clip, mapper: Mapper) -> Path:
    import hashlib
    import json

    from t2f.download import cache_dir
    from t2f.io import fingerprint

    configs = hashlib.sha256(json.dumps([generator.config.to_dict(), mapper.config.to_dict()], sort_keys=True).encode())
    return cache_dir() / "onnx" / f"{fingerprint(generator)}-{clip.fingerprint}-{fingerprint(mapper)}-{configs.hexdigest()[:8]}"


def ensure_onnx(generator: Generator, clip: Clip, mapper: Mapper, precision: Precision, artifacts: str | None = None) -> Path:
    """A directory with current ONNX graphs of these models: `artifacts` if given, else one in the cache, exported once."""
    from t2f.export.onnx_export import artifacts_current, export_artifacts

    if artifacts is not None:
        return Path(artifacts)                                         # checked against the models by the backend
    out = onnx_cache_dir(generator, clip, mapper)
    if not artifacts_current(out, generator, clip, mapper, precision):
        export_artifacts(out, generator, clip, mapper, precision, [1, 2], dict(generator="in-memory", mapper="in-memory"),
                         log=lambda *_: None)
    return out


def auto_backend(device: torch.device, artifacts: str | None, precision: Precision = Precision.FP32,
                 noise_mode: str = "const") -> str:
    """The backend expected to be fastest here that supports `noise_mode`: eager PyTorch for non-constant noise
    (exported graphs hold constant noise); TensorRT engines of this precision, then one CUDA graph (fp16) on a GPU;
    ONNX Runtime on a CPU (see benchmarks/RESULTS.md)."""
    precision = Precision.parse(precision)
    if noise_mode not in Backend.noise_modes:
        return TorchBackend.name
    if device.type == "cuda":
        plan = artifact_name("synthesis", precision, "plan")
        if artifacts and importlib.util.find_spec("tensorrt") and (Path(artifacts) / plan).is_file():
            return TensorRTBackend.name
        return CudaGraphBackend.name if precision in CudaGraphBackend.precisions else TorchBackend.name
    return OnnxRuntimeBackend.name if importlib.util.find_spec("onnxruntime") else TorchBackend.name


def make_backend(name: str, generator: Generator, clip: Clip, mapper: Mapper, device: torch.device,
                 precision: Precision = Precision.FP32, artifacts: str | None = None, noise_mode: str = "const") -> Backend:
    """A backend by name ("auto" = auto_backend); BackendUnavailable, before any export, where it cannot run here."""
    precision = Precision.parse(precision)
    models = (generator, clip, mapper)
    if name == "auto":
        name = auto_backend(device, artifacts, precision, noise_mode)
    cls = BACKEND_CLASSES.get(name)
    if cls is None:
        raise BackendUnavailable(f"unknown backend {name!r}; one of auto, {', '.join(BACKENDS)}")
    cls.check_available(device, precision)                          # before minutes of export
    if noise_mode not in cls.noise_modes:
        raise BackendUnavailable(f"noise mode {noise_mode} needs --backend torch (exported graphs use constant noise)")
    if not cls.uses_artifacts:
        return cls(generator, clip, mapper, device, precision)
    if artifacts is None and not cls.exports_on_demand:
        raise BackendUnavailable(f"--backend {name} needs --artifacts DIR with engines made by t2f-export")
    if cls.exports_on_demand:
        try:
            artifacts = ensure_onnx(generator, clip, mapper, precision, artifacts)
        except ExportError as e:
            raise BackendUnavailable(f"cannot export the ONNX graphs: {e}") from None
    return cls(artifacts, device, models, precision)
