"""Choosing and building a backend: the registry and `auto` (the on-demand ONNX export is in `ondemand`).

`auto` is the first (backend, precision) of the device's preference list that passes
`check_available`. The lists are ordered by measured end-to-end speed (benchmarks/RESULTS.md:
on the 2-core AMD EPYC development CPU, OpenVINO bf16 ran text -> uint8 image fastest; on an
H200, one fp16 CUDA graph ran fastest of what we could run there), and hold only accurate paths:
every graph within its precision's parity bounds (`t2f.export.onnx_export`: fp32 1e-4 relative,
fp16 2e-2, bf16 per graph, a failing bf16 graph runs fp32). torch-compile is left out of `auto`:
its first call compiles for 10 s to minutes, more than it saves in a run of a few images.
Given the models, `auto` skips the backends that cannot run their CLIP's text tower (every one
but `torch` runs t2f's exportable rewrite of it): such a CLIP runs on `torch`.
"""

from __future__ import annotations

import torch

from t2f.precision import Precision

from .base import Backend
from .ondemand import ensure_onnx, onnx_cache_dir  # noqa: F401  (re-exported)
from .types import BackendUnavailable, Models
from .onnx_runtime import OnnxRuntimeBackend, OnnxRuntimeTensorRTBackend
from .openvino_runtime import OpenVINOBackend
from .pytorch import CudaGraphBackend, TorchBackend, TorchCompileBackend
from .tensorrt_engines import TensorRTBackend

BACKEND_CLASSES: dict[str, type[Backend]] = {cls.name: cls for cls in (
    TorchBackend, CudaGraphBackend, TorchCompileBackend, OnnxRuntimeBackend, OpenVINOBackend, OnnxRuntimeTensorRTBackend,
    TensorRTBackend)}
BACKENDS = tuple(BACKEND_CLASSES)

FP32, FP16, BF16 = Precision.FP32, Precision.FP16, Precision.BF16
PREFERENCE: dict[str, tuple[tuple[str, Precision], ...]] = {
    "cpu": (("openvino", BF16), ("openvino", FP32), ("onnxruntime", FP32), ("torch", FP32), ("torch", BF16)),
    "cuda": (("tensorrt", FP16), ("torch-cudagraph", FP16), ("onnxruntime", FP16), ("torch", FP16),
             ("tensorrt", FP32), ("onnxruntime", FP32), ("torch", FP32)),
}


def choose(device: torch.device, backend: str = "auto", precision: Precision | None = None, artifacts=None,
           noise_mode: str = "const", memory_format: str = "nchw", models: Models | None = None) -> tuple[type[Backend], Precision]:
    """(backend class, precision) for a request; `backend` "auto" and `precision` None (auto) are resolved from the
    device's preference list: its first entry that matches what was fixed and passes `check_available` (given
    `models`, one that can run their text tower: `torch` for a tower the exportable rewrite cannot express).

    BackendUnavailable with one line where none passes.
    """
    if backend != "auto" and backend not in BACKEND_CLASSES:
        raise BackendUnavailable(f"unknown backend {backend!r}; one of auto, {', '.join(BACKENDS)}")
    candidates = [(name, p) for name, p in PREFERENCE[device.type]
                  if backend in ("auto", name) and precision in (None, p)]
    if noise_mode != "const":       # only eager PyTorch draws noise: the list's torch entries, else torch as asked
        candidates = [c for c in candidates if noise_mode in BACKEND_CLASSES[c[0]].noise_modes] or \
                     [("torch", precision or (FP32 if device.type == "cpu" else FP16))]
    if memory_format != "nchw":     # auto picks among the backends that run this layout
        candidates = [c for c in candidates if memory_format in BACKEND_CLASSES[c[0]].memory_formats]
    if backend != "auto":           # a named backend: its preferred precisions on this device, then any it has
        cls = BACKEND_CLASSES[backend]
        candidates += [(backend, p) for p in cls.precisions if (backend, p) not in candidates and precision in (None, p)]
        if not candidates:
            raise BackendUnavailable(f"{backend} runs in {' or '.join(map(str, cls.precisions))}, not {precision}")
    elif not candidates:
        layout = "" if memory_format == "nchw" else f" with {memory_format}"
        raise BackendUnavailable(f"no backend runs in {precision or 'any precision'}{layout} on {device.type}")
    errors = []
    for name, p in candidates:
        try:
            BACKEND_CLASSES[name].check_available(device, p, artifacts, noise_mode, memory_format, models)
            return BACKEND_CLASSES[name], p
        except BackendUnavailable as e:
            errors.append(e)
    # auto: why its first choice cannot run; a named backend: why its plainest precision cannot (a missing package, say)
    raise errors[0] if backend == "auto" else errors[-1]


def make_backend(name: str, models: Models, device: torch.device, precision: Precision | None = None,
                 artifacts: str | None = None, noise_mode: str = "const", memory_format: str = "nchw") -> Backend:
    """A backend by name ("auto": see `choose`), in `precision` (None: the backend's best here) and `memory_format`
    (MEMORY_FORMATS); BackendUnavailable, before any export, where it cannot run here."""
    from t2f.graphs import ExportError

    cls, precision = choose(device, name, precision, artifacts, noise_mode, memory_format, models)
    try:
        return cls.create(models, device, precision, artifacts, memory_format)
    except ExportError as e:                     # artifacts that cannot be used here: this backend cannot run
        raise BackendUnavailable(str(e)) from None
