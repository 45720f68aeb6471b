"""ONNX Runtime on the exported graphs: the CUDA execution provider on a GPU (onnxruntime-gpu), else the CPU; IO binding
onto the torch tensors, ordered with torch's stream. `onnxruntime-tensorrt` (its own file) is the same with ONNX
Runtime's TensorRT execution provider.

A session whose first provider is not the one asked for is refused (ONNX Runtime otherwise falls back to
another provider silently, with none of our options), and so is a TensorRT session that would run some nodes
on the CPU (`session_config`); ONNX Runtime's own exception types (which do not derive from RuntimeError)
become BackendUnavailable when a session is made and RuntimeError when it runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from t2f.artifacts import onnx_session
from t2f.errors import first_line
from t2f.precision import Precision
from t2f.specs import GraphSpec

from .base import ArtifactBackend, BackendUnavailable, cpu_threads, pad_rows, runnable_batch
from .registry import register

_NUMPY_TYPES = {torch.float32: "float32", torch.int32: "int32", torch.uint8: "uint8", torch.float16: "float16"}
ORT_CACHE = "onnxruntime-tensorrt"              # engine and timing caches of ONNX Runtime's TensorRT provider
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of `device`: plain "cuda" is torch's current device (as everywhere in torch), not 0."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _shapes(profile: dict[str, tuple], which: int) -> str:
    """ONNX Runtime's TensorRT profile syntax: "tokens:1x77,psi:1"."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def ort_providers(provider: str, device: torch.device, stream: int, spec: GraphSpec | None = None,
                  batch: tuple[int, int, int] = (1, 8, 32), cache: Path | None = None,
                  precision: Precision = Precision.FP32, device_id: int | None = None) -> list:
    """The execution providers of one graph's session (a pure function of its arguments).

    CPU: the CPU provider. CUDA: the CUDA provider on `device_id` with `stream` (a non-default torch stream; ONNX Runtime
    treats 0 as "none") as its compute stream, so the backend can order ONNX Runtime's work with torch's; no TF32;
    cuDNN's convolution algorithm chosen by its heuristics (the provider's default, an exhaustive timed search, makes
    first calls slow and the choice vary from run to run). With provider "tensorrt", ONNX Runtime's TensorRT provider
    alone (same device and stream), with the spec's profile for `batch`, fp16 where the graph computes in fp16 (the
    spec's compute precision: the mapper stays fp32), and its engine and timing caches in `cache`, so engines are
    built once.
    """
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    index = device.index if device_id is None else device_id
    common = {"device_id": str(index or 0), "user_compute_stream": str(stream), "has_user_compute_stream": "1"}
    if provider != "tensorrt":
        return [("CUDAExecutionProvider", dict(common, use_tf32="0", cudnn_conv_algo_search="HEURISTIC"))]
    profile = spec.profile(batch)
    options = dict(common, trt_engine_cache_enable="True", trt_engine_cache_path=str(cache),
                   trt_timing_cache_enable="True", trt_timing_cache_path=str(cache),
                   trt_fp16_enable="True" if spec.compute_precision(precision).half else "False",
                   trt_profile_min_shapes=_shapes(profile, 0), trt_profile_opt_shapes=_shapes(profile, 1),
                   trt_profile_max_shapes=_shapes(profile, 2))
    return [("TensorrtExecutionProvider", options)]


def session_config(provider: str, device: torch.device) -> dict[str, str]:
    """The session configuration entries of a graph's session (a pure function of its arguments).

    No busy-waiting between runs: spinning threads steal the cores the next stage needs (measured on 2 cores). With
    the TensorRT provider, no node may fall back to the CPU provider ("session.disable_cpu_ep_fallback"): the session
    is refused instead of running part of the graph on the CPU. Not with the CUDA provider: there ONNX Runtime places
    the dynamic batch's shape arithmetic (Shape -> Gather -> Concat, in every exported graph) on the CPU on purpose,
    which that option cannot tell from a fallback, so every session would be refused; the CUDA provider has kernels
    for every compute node of the exported graphs.
    """
    config = {"session.intra_op.allow_spinning": "0"}
    if device.type == "cuda" and provider == "tensorrt":
        config["session.disable_cpu_ep_fallback"] = "1"
    return config


def check_first_provider(session, wanted: str, what: str) -> None:
    """BackendUnavailable where ONNX Runtime gave `what` another provider than `wanted` (its silent fallback)."""
    got = session.get_providers()
    if not got or got[0] != wanted:
        raise BackendUnavailable(f"ONNX Runtime could not start {wanted} for {what} (it fell back to "
                                 f"{got[0] if got else 'nothing'}): its libraries do not load here")


@register
class OnnxRuntimeBackend(ArtifactBackend):
    """The exported ONNX graphs in ONNX Runtime (CUDA provider on a GPU, else CPU), with IO binding onto torch tensors."""

    name = "onnxruntime"
    description = ("the exported ONNX graphs with IO binding onto torch tensors, on a torch stream given as ONNX Runtime's "
                   "compute stream")
    precisions = (Precision.FP32, Precision.FP16)
    auto_rank = {"cpu": {Precision.FP32: 30}, "cuda": {Precision.FP16: 30, Precision.FP32: 60}}
    modules = ("onnxruntime",)
    install = 'pip install "t2f[export]", or onnxruntime-gpu for CUDA'
    exports_on_demand = True
    provider = "cuda"                   # on a GPU: the CUDA execution provider

    @classmethod
    def check_runtime(cls, device, precision):
        if device.type == "cuda":
            import onnxruntime

            wanted = PROVIDER_NAMES[cls.provider]
            if wanted not in onnxruntime.get_available_providers():
                raise BackendUnavailable(f"onnxruntime has no {wanted} here (install onnxruntime-gpu"
                                         f"{' and TensorRT' if cls.provider == 'tensorrt' else ''})")

    def __init__(self, models, device, precision, artifacts=None, memory_format="nchw"):
        import onnxruntime

        super().__init__(models, device, precision, artifacts, memory_format)
        artifacts, manifest = self.artifacts, self.manifest
        options = onnxruntime.SessionOptions()
        for key, value in session_config(self.provider, device).items():
            options.add_session_config_entry(key, value)
        if device.type == "cpu":
            options.intra_op_num_threads = cpu_threads()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.device_id = cuda_index(device) if device.type == "cuda" else 0
        self.profile = manifest.batch_profile
        if self.provider == "tensorrt":
            self.min_batch, self.max_batch = self.profile[0], self.profile[2]
            (artifacts / ORT_CACHE).mkdir(exist_ok=True)
        wanted = PROVIDER_NAMES["cpu" if device.type == "cpu" else self.provider]
        self.sessions = {}
        for graph, spec in self.specs.items():
            name = spec.file_name(precision)
            onnx_session(artifacts / name, manifest.sha256(name))         # checksum and loadability
            providers = ort_providers(self.provider, device, self.stream.cuda_stream if self.stream else 0, spec, self.profile,
                                      artifacts / ORT_CACHE, precision, self.device_id)
            try:
                session = onnxruntime.InferenceSession(str(artifacts / name), options, providers=providers)
            except Exception as e:          # onnxruntime's Fail, InvalidArgument, EPFail ... derive from Exception only
                raise BackendUnavailable(f"ONNX Runtime cannot load {name} with {wanted}: {first_line(e)}") from None
            check_first_provider(session, wanted, name)
            self.sessions[graph] = session
        self.outputs: dict[tuple, torch.Tensor] = {}

    def _run(self, spec: GraphSpec, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        session = self.sessions[spec.name]
        binding = session.io_binding()
        kind = self.device.type
        batch = next(iter(feeds.values())).shape[0]
        rows = runnable_batch(batch, self.min_batch, self.max_batch)
        for name, tensor in feeds.items():
            tensor = pad_rows(tensor.to(self.device), rows).contiguous()
            feeds[name] = tensor                                          # keep it alive until run returns
            binding.bind_input(name, kind, self.device_id, _NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        key = (spec.name, rows)
        if key not in self.outputs:                                       # allocated once per batch size
            self.outputs[key] = torch.empty(spec.output_shape(rows), dtype=spec.output.dtype, device=self.device)
        out = self.outputs[key]
        binding.bind_output(spec.output.name, kind, self.device_id, _NUMPY_TYPES[out.dtype], list(out.shape), out.data_ptr())
        try:
            if self.stream is None:
                session.run_with_iobinding(binding)
                return out[:batch]
            # ONNX Runtime works on self.stream: it starts after torch's queued work (the inputs just written), and
            # torch's later work waits for it. synchronize_inputs() alone does not order this for every provider.
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            session.run_with_iobinding(binding)
            current.wait_stream(self.stream)
        except Exception as e:                                            # onnxruntime's own types: see the module
            if isinstance(e, RuntimeError):
                raise
            raise RuntimeError(f"ONNX Runtime failed running {spec.name}: {first_line(e)}") from None
        return out[:batch]
