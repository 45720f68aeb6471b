"""Device selection, and which optional runtimes this Python can import."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; refuses a CUDA device that is not there."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device} requested but there are {torch.cuda.device_count()} CUDA devices")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def pin_cuda_numerics() -> None:
    """What t2f's fp32 and bit-for-bit claims need on CUDA, set process-wide when a CUDA backend is made.

    True fp32: no TF32 in cuBLAS or cuDNN (PyTorch lets cuDNN's convolutions use TF32 by default, so an "fp32"
    synthesis on an A100/H100/H200 would be TF32). Deterministic cuDNN: no autotuning by timing (which can pick
    another algorithm per run) and no non-deterministic kernels (conv_transpose2d's backward-data kernels among
    them), so the same inputs give the same bits run after run and a row's result does not depend on its block.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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
