"""Device selection, placing modules on a device without moving the caller's, CUDA numerics, which optional
runtimes this Python can import, and the CPU's name and load that benchmark reports carry."""

from __future__ import annotations

import contextlib
import copy
import platform

import torch
from torch import nn

from .errors import UsageError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; refuses a CUDA device that is not there."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} requested but CUDA is not available; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UsageError(f"device {device} requested but there are {torch.cuda.device_count()} CUDA devices")
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def on_device(actual: torch.device, wanted: torch.device | str) -> bool:
    """Whether a tensor on `actual` is on `wanted` ("cuda" without an index is the current CUDA device, as in torch)."""
    wanted = torch.device(wanted)
    if actual.type != wanted.type:
        return False
    if wanted.index is None and wanted.type == "cuda":
        return actual.index == torch.cuda.current_device()
    return wanted.index is None or actual.index == wanted.index


def placed(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module` itself where all its parameters and buffers are on `device` already, else a copy moved there.

    The caller's module is never moved, cast or switched to eval: a pipeline built on a GPU from modules that a CPU
    pipeline (or the caller) still uses leaves them where they are. A copy costs the module's memory once more.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if all(on_device(t.device, device) for t in tensors):
        return module
    return copy.deepcopy(module).to(device)


# ----------------------------------------------------------------------------
# CUDA numerics: cuBLAS / cuDNN flags, process-wide in torch.

CUDA_NUMERICS_FLAGS = ("matmul_tf32", "cudnn_tf32", "cudnn_deterministic", "cudnn_benchmark")
PINNED = dict(matmul_tf32=False, cudnn_tf32=False, cudnn_deterministic=True, cudnn_benchmark=False)
# PyTorch's own defaults (TF32 in cuDNN's convolutions, full fp32 in matmuls, cuDNN free to pick non-deterministic
# kernels) with cudnn.benchmark on, as most PyTorch users run fp32 on a GPU: t2f-bench's second fp32 baseline.
PYTORCH_DEFAULTS = dict(matmul_tf32=False, cudnn_tf32=True, cudnn_deterministic=False, cudnn_benchmark=True)


def _tf32(legacy, fp32_precision) -> bool:
    try:
        return bool(legacy())
    except RuntimeError:        # the fp32_precision API was used: torch refuses to read its legacy flag until it is set
        return fp32_precision() == "tf32"


def cuda_numerics() -> dict[str, bool]:
    """The CUDA numerics flags as they are now: {matmul_tf32, cudnn_tf32, cudnn_deterministic, cudnn_benchmark}."""
    return dict(matmul_tf32=_tf32(lambda: torch.backends.cuda.matmul.allow_tf32, lambda: torch.backends.cuda.matmul.fp32_precision),
                cudnn_tf32=_tf32(lambda: torch.backends.cudnn.allow_tf32, lambda: torch.backends.cudnn.conv.fp32_precision),
                cudnn_deterministic=torch.backends.cudnn.deterministic, cudnn_benchmark=torch.backends.cudnn.benchmark)


def fp32_label(device: torch.device | str) -> str:
    """What "fp32" computes on `device` with the flags as they are now: "fp32" on the CPU or with no TF32, else e.g.
    "fp32 (TF32 in cuDNN convolutions)": PyTorch's default on CUDA, which t2f-train keeps."""
    if torch.device(device).type != "cuda":
        return "fp32"
    flags = cuda_numerics()
    tf32 = [what for what, on in (("cuDNN convolutions", flags["cudnn_tf32"]), ("matmuls", flags["matmul_tf32"])) if on]
    return f"fp32 (TF32 in {' and '.join(tf32)})" if tf32 else "fp32"


def set_cuda_numerics(flags: dict[str, bool]) -> None:
    """Sets the flags (torch's legacy switches, which also set the fp32_precision API's state)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(flags["matmul_tf32"])
    torch.backends.cudnn.allow_tf32 = bool(flags["cudnn_tf32"])
    torch.backends.cudnn.deterministic = bool(flags["cudnn_deterministic"])
    torch.backends.cudnn.benchmark = bool(flags["cudnn_benchmark"])


def pin_cuda_numerics() -> None:
    """What t2f's fp32 and bit-for-bit claims need on CUDA (PINNED), set process-wide when a CUDA backend is made.

    True fp32: no TF32 in cuBLAS or cuDNN (PyTorch lets cuDNN's convolutions use TF32 by default, so an "fp32"
    synthesis on an A100/H100/H200 would be TF32). Deterministic cuDNN: no autotuning by timing (which can pick
    another algorithm per run) and no non-deterministic kernels (conv_transpose2d's backward-data kernels among
    them), so the same inputs give the same bits run after run and a row's result does not depend on its block.
    """
    set_cuda_numerics(PINNED)


@contextlib.contextmanager
def numerics(flags: dict[str, bool]):
    """The CUDA numerics flags set to `flags` inside the block, and restored to what they were after it (also on an
    exception): one benchmark row can run with PyTorch's defaults between rows that run pinned."""
    saved = cuda_numerics()
    set_cuda_numerics(flags)
    try:
        yield
    finally:
        set_cuda_numerics(saved)


def importable(name: str) -> bool:
    """True where `import name` works here: an optional runtime that is missing, or installed but broken, is False."""
    import importlib

    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def cpu_threads() -> int:
    """Threads of every CPU runtime t2f drives: torch's intra-op count (torch.set_num_threads / OMP_NUM_THREADS set it)."""
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what `lscpu` shows as "Model name")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown model")
    except OSError:
        return platform.processor() or "unknown model"


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages, as /proc/loadavg gives them ("?" where it cannot be read)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"
