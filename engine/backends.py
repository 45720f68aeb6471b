"""Backends: one call shape for every way of running the three graphs.

    encode(tokens [B, context] int32)                  -> embedding [B, D] float32
    map(embedding [B, D], z [B, z_dim], psi [B])       -> ws [B, num_ws, w_dim] float32
    synthesize(ws [B, num_ws, w_dim])                  -> image [B, H, W, 3] uint8
    __call__(tokens, z, psi)                           -> image, the three in a row

Torch tensors in, torch tensors out, on the backend's device. Backends other than `torch`
allocate their input and output buffers once per batch size and return those buffers:
a result is valid until the next call with the same batch size (copy it to keep it).

    torch             eager PyTorch, fp32 or fp16 (CUDA)
    torch-cudagraph   fp16, the whole tokens -> uint8 image pipeline captured as one CUDA graph per batch size
    onnxruntime       the exported ONNX graphs; CUDA or TensorRT execution provider when installed, else CPU;
                      IO binding onto the torch tensors
    tensorrt          the exported TensorRT engines, execute_async_v3 on torch tensors, one stream
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from t2f.clip import Clip
from t2f.graphs import MapperGraph, SynthesisGraph, TextEncoderGraph
from t2f.mapper import Mapper
from t2f.stylegan2 import Generator, to_uint8

BACKENDS = ("torch", "torch-cudagraph", "onnxruntime", "tensorrt")


class BackendUnavailable(Exception):
    """A backend that cannot run here (missing library, GPU or artifacts)."""


class Backend:
    name = "base"

    def __init__(self, device: torch.device):
        self.device = device

    max_batch = 1 << 30                                   # largest batch one call takes (engines have a profile)

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

    def __init__(self, generator: Generator, clip: Clip, mapper: Mapper, device: torch.device, precision: str = "fp32"):
        super().__init__(device)
        if precision == "fp16" and device.type != "cuda":
            raise BackendUnavailable("fp16 needs a CUDA device")
        self.half = precision == "fp16"
        self.clip = clip.to(device)
        self.mapper = MapperGraph(mapper, generator.w_avg).to(device)
        self.synthesis = generator.synthesis.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, tokens):
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.half):
            return self.clip.text_encoder(tokens.to(self.device, torch.long)).float()

    @torch.no_grad()
    def map(self, embedding, z, psi):
        return self.mapper(embedding.to(self.device), z.to(self.device), psi.to(self.device))

    @torch.no_grad()
    def synthesize_float(self, ws):
        return self.synthesis(ws.half() if self.half else ws, noise_mode="const")

    @torch.no_grad()
    def synthesize(self, ws):
        return to_uint8(self.synthesize_float(ws.to(self.device)))


class CudaGraphBackend(Backend):
    """fp16; tokens -> uint8 image captured as one CUDA graph per batch size (launch overhead gone)."""

    name = "torch-cudagraph"

    def __init__(self, generator: Generator, clip: Clip, mapper: Mapper, device: torch.device, precision: str = "fp16"):
        if device.type != "cuda":
            raise BackendUnavailable("torch-cudagraph needs a CUDA device")
        if precision != "fp16":
            raise BackendUnavailable("torch-cudagraph runs in fp16; pass --precision fp16")
        super().__init__(device)
        self.text = TextEncoderGraph(clip.model, half=True).to(device)
        self.mapper = MapperGraph(mapper, generator.w_avg).to(device)
        self.synthesis = SynthesisGraph(generator, half=True).to(device)
        self.context, self.z_dim = clip.context_length, mapper.z_dim
        self.graphs: dict[int, tuple] = {}

    def _pipeline(self, tokens, z, psi):
        embedding = self.text(tokens)
        ws = self.mapper(embedding, z, psi)
        return embedding, ws, self.synthesis(ws)

    @torch.no_grad()
    def _graph(self, batch: int):
        if batch not in self.graphs:
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

    def _run(self, tokens, z, psi):
        graph, inputs, outputs = self._graph(tokens.shape[0])
        for buffer, value in zip(inputs, (tokens, z, psi)):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return outputs

    def full(self, tokens, z, psi):
        _, ws, image = self._run(tokens, z, psi)
        return ws, image

    def encode(self, tokens):
        with torch.no_grad():
            return self.text(tokens.to(self.device, torch.int32))

    def map(self, embedding, z, psi):
        with torch.no_grad():
            return self.mapper(embedding.to(self.device), z.to(self.device), psi.to(self.device))

    def synthesize(self, ws):
        with torch.no_grad():
            return self.synthesis(ws.to(self.device))


# ----------------------------------------------------------------------------
# ONNX Runtime.

class _ArtifactBackend(Backend):
    """Runs exported graphs by name: subclasses implement _run(graph, feeds, output name, output dtype)."""

    def encode(self, tokens):
        return self._run("text_encoder", {"tokens": tokens.to(torch.int32)}, "embedding", torch.float32)

    def map(self, embedding, z, psi):
        return self._run("mapper", {"embedding": embedding.float(), "z": z.float(), "psi": psi.float()}, "ws", torch.float32)

    def synthesize(self, ws):
        return self._run("synthesis", {"ws": ws.float()}, "image", torch.uint8)


_NUMPY_TYPES = {torch.float32: "float32", torch.int32: "int32", torch.uint8: "uint8", torch.float16: "float16"}


class OnnxRuntimeBackend(_ArtifactBackend):
    """The exported ONNX graphs in ONNX Runtime, with IO binding onto torch tensors."""

    name = "onnxruntime"

    def __init__(self, artifacts: str | os.PathLike, device: torch.device, models: tuple, precision: str = "fp32", threads: int = 0):
        try:
            import onnxruntime
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime or onnxruntime-gpu)") from None
        from t2f.export.onnx_export import check_artifacts, onnx_session

        super().__init__(device)
        artifacts = Path(artifacts)
        manifest = _checked(check_artifacts, artifacts, models, precision)
        suffix = "" if precision == "fp32" else ".fp16"
        available = onnxruntime.get_available_providers()
        if device.type == "cuda":
            options_for = {"device_id": device.index or 0}
            providers = [(p, options_for) for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            if not providers:
                raise BackendUnavailable("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")
        else:
            providers = ["CPUExecutionProvider"]
        options = onnxruntime.SessionOptions()
        # No busy-waiting between runs: spinning threads steal the cores the next stage needs (measured on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for graph in ("text_encoder", "mapper", "synthesis"):
            name = f"{graph}{suffix}.onnx"
            entry = manifest.get("onnx", {}).get(name)
            if entry is None:
                raise BackendUnavailable(f"{artifacts} has no {name}; run t2f-export{' --fp16' if suffix else ''} --onnx-only --out {artifacts}")
            onnx_session(artifacts / name, entry["sha256"])             # checksum and loadability
            self.sessions[graph] = onnxruntime.InferenceSession(str(artifacts / name), options, providers=providers)
        self.outputs: dict[tuple, torch.Tensor] = {}
        models = manifest["models"]
        self.shapes = dict(embedding=[models["clip"]["embed_dim"]], ws=[models["generator"]["num_ws"], models["generator"]["w_dim"]],
                           image=[models["generator"]["resolution"], models["generator"]["resolution"], 3])

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], output: str, dtype: torch.dtype) -> torch.Tensor:
        session = self.sessions[graph]
        binding = session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, tensor in feeds.items():
            tensor = tensor.to(self.device).contiguous()
            feeds[name] = tensor                                          # keep it alive until run returns
            binding.bind_input(name, kind, index, _NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        batch = next(iter(feeds.values())).shape[0]
        key = (graph, batch)
        if key not in self.outputs:                                       # allocated once per batch size
            self.outputs[key] = torch.empty([batch, *self.shapes[output]], dtype=dtype, device=self.device)
        out = self.outputs[key]
        binding.bind_output(session.get_outputs()[0].name, kind, index, _NUMPY_TYPES[dtype], list(out.shape), out.data_ptr())
        if kind == "cuda":
            binding.synchronize_inputs()
        session.run_with_iobinding(binding)
        if kind == "cuda":
            binding.synchronize_outputs()
        return out


# ----------------------------------------------------------------------------
# TensorRT (not run by us: TensorRT cannot be installed on our machines).


class TensorRTBackend(_ArtifactBackend):
    """The exported TensorRT engines: execute_async_v3 with set_tensor_address on torch tensors, one stream."""

    name = "tensorrt"

    def __init__(self, artifacts: str | os.PathLike, device: torch.device, models: tuple, precision: str = "fp16",
                 cuda_graph: bool = True):
        from t2f.export.onnx_export import check_artifacts, sha256_file
        from t2f.export.tensorrt import load_engine
        from t2f.graphs import ExportError

        if device.type != "cuda":
            raise BackendUnavailable("tensorrt needs a CUDA device")
        super().__init__(device)
        artifacts = Path(artifacts)
        manifest = _checked(check_artifacts, artifacts, models, precision)
        suffix = "" if precision == "fp32" else ".fp16"
        records = (manifest.get("tensorrt") or {}).get("engines", {})
        self.engines = {}
        for graph in ("text_encoder", "mapper", "synthesis"):
            plan, onnx = artifacts / f"{graph}{suffix}.plan", f"{graph}{suffix}.onnx"
            record = records.get(plan.name)
            if (not record or not plan.is_file() or record.get("sha256") != sha256_file(plan)
                    or record["record"].get("onnx_sha256") != manifest["onnx"][onnx]["sha256"]):
                raise BackendUnavailable(f"{plan} is missing, changed, or built from another {onnx}; run t2f-export --out {artifacts} again")
            try:
                self.engines[graph] = load_engine(plan, manifest)
            except (ExportError, OSError) as e:
                raise BackendUnavailable(str(e)) from None
            self.max_batch = min(self.max_batch, *(shapes[2][0] for shapes in record["record"]["profiles"].values()))
        self.contexts = {g: e.create_execution_context() for g, e in self.engines.items()}
        self.stream = torch.cuda.Stream(device)
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.cuda_graph, self.graphs = cuda_graph, {}

    def full(self, tokens, z, psi):
        """The three engines in a row; with cuda_graph, their launches are captured once per batch size and replayed,
        each batch size with execution contexts of its own (a captured graph keeps its context's shapes)."""
        batch = tokens.shape[0]
        if not self.cuda_graph:
            ws = self.map(self.encode(tokens), z, psi)
            return ws, self.synthesize(ws)
        if batch not in self.graphs:
            contexts = {g: e.create_execution_context() for g, e in self.engines.items()}
            static = (tokens.to(self.device, torch.int32).clone(), z.to(self.device).float().clone(), psi.to(self.device).float().clone())
            e = self._run("text_encoder", {"tokens": static[0]}, "embedding", torch.float32, contexts)
            ws = self._run("mapper", {"embedding": e, "z": static[1], "psi": static[2]}, "ws", torch.float32, contexts)
            image = self._run("synthesis", {"ws": ws}, "image", torch.uint8, contexts)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # The warm-up bound every tensor address (static inputs, this batch's outputs); capture the launches.
            with torch.cuda.graph(graph, stream=self.stream):
                for name in ("text_encoder", "mapper", "synthesis"):
                    contexts[name].execute_async_v3(self.stream.cuda_stream)
            self.graphs[batch] = (graph, static, ws, image, contexts)
        graph, static, ws, image, _ = self.graphs[batch]
        for buffer, value in zip(static, (tokens, z, psi)):
            buffer.copy_(value, non_blocking=True)
        graph.replay()                                           # on the current stream, after the copies
        return ws, image

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], output: str, dtype: torch.dtype, contexts=None) -> torch.Tensor:
        context = (contexts or self.contexts)[graph]
        for name, tensor in feeds.items():
            tensor = tensor.to(self.device).contiguous()
            feeds[name] = tensor
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{name} {tuple(tensor.shape)} is outside the {graph} engine's profile "
                                 f"(batch up to {self.max_batch}); re-export with a larger --batch")
            context.set_tensor_address(name, tensor.data_ptr())
        key = (graph, next(iter(feeds.values())).shape[0], id(context))
        if key not in self.outputs:
            self.outputs[key] = torch.empty(tuple(context.get_tensor_shape(output)), dtype=dtype, device=self.device)
        out = self.outputs[key]
        context.set_tensor_address(output, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {graph}")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out


# ----------------------------------------------------------------------------
# Choosing and building a backend.


def onnx_cache_dir(generator: Generator, clip: Clip, mapper: Mapper) -> Path:
    from t2f.download import cache_dir
    from t2f.io import fingerprint

    import hashlib
    import json

    configs = hashlib.sha256(json.dumps([generator.config.to_dict(), mapper.config.to_dict()], sort_keys=True).encode())
    return cache_dir() / "onnx" / f"{fingerprint(generator)}-{clip.fingerprint}-{fingerprint(mapper)}-{configs.hexdigest()[:8]}"


def ensure_onnx(generator: Generator, clip: Clip, mapper: Mapper, precision: str, artifacts: str | None = None, log=None) -> Path:
    """A directory with current ONNX graphs of these models: `artifacts` if given, else one in the cache, exported once."""
    from t2f.export.onnx_export import artifacts_current, export_artifacts

    if artifacts is not None:
        return Path(artifacts)                                         # checked against the models by the backend
    out = onnx_cache_dir(generator, clip, mapper)
    fp16 = precision == "fp16"
    if not artifacts_current(out, generator, clip, mapper, fp16):
        export_artifacts(out, generator, clip, mapper, fp16, [1, 2], dict(generator="in-memory", mapper="in-memory"),
                         log=log or (lambda *_: None))
    return out


def auto_backend(device: torch.device, artifacts: str | None, precision: str = "fp32", noise_mode: str = "const") -> str:
    """The backend expected to be fastest here: TensorRT engines of this precision, then one CUDA graph (fp16) on a
    GPU; ONNX Runtime on a CPU (see benchmarks/RESULTS.md); eager PyTorch for non-constant noise."""
    import importlib.util

    if noise_mode != "const":
        return "torch"
    if device.type == "cuda":
        suffix = ".fp16" if precision == "fp16" else ""
        if artifacts and importlib.util.find_spec("tensorrt") and (Path(artifacts) / f"synthesis{suffix}.plan").is_file():
            return "tensorrt"
        return "torch-cudagraph" if precision == "fp16" else "torch"
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch"


def _checked(check, artifacts: Path, models: tuple, precision: str) -> dict:
    from t2f.graphs import ExportError

    try:
        return check(artifacts, *models, precision == "fp16")
    except ExportError as e:
        raise BackendUnavailable(str(e)) from None


def make_backend(name: str, generator: Generator, clip: Clip, mapper: Mapper, device: torch.device,
                 precision: str = "fp32", artifacts: str | None = None, log=None, noise_mode: str = "const") -> Backend:
    models = (generator, clip, mapper)
    if name == "auto":
        name = auto_backend(device, artifacts, precision, noise_mode)
    if name == "torch":
        return TorchBackend(generator, clip, mapper, device, precision)
    if name == "torch-cudagraph":
        return CudaGraphBackend(generator, clip, mapper, device, precision)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(ensure_onnx(generator, clip, mapper, precision, artifacts, log), device, models, precision)
    if name == "tensorrt":
        if artifacts is None:
            raise BackendUnavailable("--backend tensorrt needs --artifacts DIR with engines made by t2f-export")
        return TensorRTBackend(artifacts, device, models, precision)
    raise BackendUnavailable(f"unknown backend {name!r}; one of auto, {', '.join(BACKENDS)}")
