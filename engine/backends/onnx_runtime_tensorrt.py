"""ONNX Runtime with its TensorRT execution provider (opt-in): the export's profile, fp16 where the artifacts are fp16,
engine and timing caches in the artifact directory (`ORT_CACHE`). The session and IO binding are `onnxruntime`'s
(`onnx_runtime.ort_providers` says what differs); a session that would leave nodes to the CPU provider is refused."""

from __future__ import annotations

from .onnx_runtime import OnnxRuntimeBackend
from .registry import register


@register
class OnnxRuntimeTensorRTBackend(OnnxRuntimeBackend):
    """ONNX Runtime with its TensorRT execution provider (opt-in): the export's profile (a batch below its minimum
    is padded, one above its maximum refused), fp16 for fp16 artifacts, caches in the artifacts."""

    name = "onnxruntime-tensorrt"
    description = ("ONNX Runtime's TensorRT execution provider (opt-in): the export's profile (a smaller batch padded to "
                   "its minimum), fp16 for fp16 graphs, engine and timing caches in `ARTIFACTS/onnxruntime-tensorrt/`")
    devices = ("cuda",)
    auto_rank = {}                      # opt-in: auto never picks it
    provider = "tensorrt"
