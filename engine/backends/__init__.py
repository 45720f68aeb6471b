"""Backends: one call shape for every way of running the three graphs (see `base` for the contract).

    torch                  eager PyTorch, fp32, fp16 (CUDA) or bf16 (CPU); every noise mode
    torch-cudagraph        fp16, the whole tokens -> uint8 image pipeline captured as one CUDA graph per batch size
    torch-compile          each stage through torch.compile (Inductor), static shapes, CUDA graphs on a GPU
    onnxruntime            the exported ONNX graphs; the CUDA execution provider on a GPU (onnxruntime-gpu), else the CPU
    openvino               the exported ONNX graphs through OpenVINO on the CPU, fp32 or bf16
    onnxruntime-tensorrt   ONNX Runtime's TensorRT execution provider (opt-in)
    tensorrt               the exported TensorRT engines, captured as one CUDA graph per batch size

One file per runtime; `registry` holds the backends, `choose`, `auto`'s preference lists and the on-demand export.
"""

from .base import MEMORY_FORMATS, ArtifactBackend, Backend, BackendUnavailable, Models, cpu_threads, pad_rows, runnable_batch
from .ondemand import ensure_onnx, onnx_cache_dir
from .registry import BACKEND_CLASSES, BACKENDS, PREFERENCE, choose, make_backend
from .onnx_runtime import ORT_CACHE, OnnxRuntimeBackend, OnnxRuntimeTensorRTBackend, check_first_provider, ort_providers, session_config
from .openvino_runtime import OpenVINOBackend
from .pytorch import CudaGraphBackend, TorchBackend, TorchCompileBackend
from .tensorrt_engines import TensorRTBackend, enqueue

__all__ = ["MEMORY_FORMATS", "ArtifactBackend", "Backend", "BackendUnavailable", "Models", "cpu_threads", "pad_rows", "runnable_batch",
           "BACKEND_CLASSES", "BACKENDS", "PREFERENCE", "choose", "ensure_onnx", "make_backend", "onnx_cache_dir",
           "ORT_CACHE", "OnnxRuntimeBackend", "OnnxRuntimeTensorRTBackend", "check_first_provider", "ort_providers", "session_config",
           "OpenVINOBackend", "CudaGraphBackend", "TorchBackend", "TorchCompileBackend", "TensorRTBackend", "enqueue"]
