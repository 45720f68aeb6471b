"""Backends: one call shape for every way of running the three graphs (see `base` for the contract).

    torch                  eager PyTorch, fp32, fp16 (CUDA) or bf16 (CPU); every noise mode
    torch-cudagraph        fp16, the whole tokens -> uint8 image pipeline captured as one CUDA graph per batch size
    torch-compile          each stage through torch.compile (Inductor), static shapes, CUDA graphs on a GPU
    onnxruntime            the exported ONNX graphs; the CUDA execution provider on a GPU (onnxruntime-gpu), else the CPU
    openvino               the exported ONNX graphs through OpenVINO on the CPU, fp32 or bf16
    onnxruntime-tensorrt   ONNX Runtime's TensorRT execution provider (opt-in)
    tensorrt               the exported TensorRT engines, captured as one CUDA graph per batch size

One file per runtime, each registering its class with `@register`; BUILTIN lists them (in the order `--backend`
lists the backends), and other packages add theirs through the entry-point group `t2f.backends` (`registry`, which
also holds `choose`, `auto`'s preference lists and `make_backend`; the on-demand ONNX export is in `ondemand`).
"""

import importlib

from .base import MEMORY_FORMATS, ArtifactBackend, Backend, BackendUnavailable, Models, cpu_threads, pad_rows, runnable_batch
from .ondemand import ensure_onnx, onnx_cache_dir
from .registry import BACKEND_CLASSES, backend_names, builtin_classes, choose, load_entry_points, make_backend, preference, register

BUILTIN = ("pytorch", "onnx_runtime", "openvino_runtime", "onnx_runtime_tensorrt", "tensorrt_engines")
for _module in BUILTIN:
    importlib.import_module(f"{__name__}.{_module}")
load_entry_points()

from .onnx_runtime import ORT_CACHE, OnnxRuntimeBackend, check_first_provider, ort_providers, session_config  # noqa: E402
from .onnx_runtime_tensorrt import OnnxRuntimeTensorRTBackend  # noqa: E402
from .openvino_runtime import OpenVINOBackend  # noqa: E402
from .pytorch import CudaGraphBackend, TorchBackend, TorchCompileBackend  # noqa: E402
from .tensorrt_engines import TensorRTBackend, enqueue  # noqa: E402

__all__ = ["MEMORY_FORMATS", "ArtifactBackend", "Backend", "BackendUnavailable", "Models", "cpu_threads", "pad_rows", "runnable_batch",
           "BACKEND_CLASSES", "BUILTIN", "backend_names", "builtin_classes", "choose", "ensure_onnx", "load_entry_points",
           "make_backend", "onnx_cache_dir", "preference", "register",
           "ORT_CACHE", "OnnxRuntimeBackend", "OnnxRuntimeTensorRTBackend", "check_first_provider", "ort_providers", "session_config",
           "OpenVINOBackend", "CudaGraphBackend", "TorchBackend", "TorchCompileBackend", "TensorRTBackend", "enqueue"]
