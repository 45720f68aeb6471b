"""Compute precision: one small type, parsed once at a command's boundary and passed down as a value.

`Precision.FP32` runs everything in float32. `Precision.FP16` (CUDA only) runs CLIP's text tower
in half precision (LayerNorm and softmax in fp32) and the generator's `num_fp16_res` highest
resolutions in half precision. `Precision.BF16` (a CPU with bfloat16 instructions: AVX512_BF16 or
AMX) runs the text tower and the whole synthesis network's convolutions and matrix products in
bfloat16 with float32 accumulation, each graph only where it passes its bf16 parity bounds (else that
graph stays fp32; see `t2f.export.onnx_export.BF16_BOUNDS`). In every precision the mapper, the ws
and the demodulation stay in fp32. It is a `str` enum, so it compares equal to "fp32" / "fp16" /
"bf16" and is written to JSON as that string.

Which precision runs on which device is decided here and nowhere else (`check_device`).
"""

from __future__ import annotations

import enum
import functools

import torch

from .errors import UsageError


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where this CPU has native bfloat16 instructions (avx512_bf16 or amx_bf16 in /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return has_bf16_flag(f.read())
    except OSError:
        return False


def has_bf16_flag(cpuinfo: str) -> bool:
    """Whether the first "flags" line of a /proc/cpuinfo text names avx512_bf16 or amx_bf16."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(set(line.partition(":")[2].split()) & {"avx512_bf16", "amx_bf16"})
    return False


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        """ "fp32" / "fp16" / "bf16" (or a Precision) -> Precision; ValueError naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"precision must be one of {', '.join(p.value for p in cls)}, got {value!r}") from None

    @classmethod
    def from_flag(cls, fp16: bool) -> "Precision":
        """t2f-export's --fp16 flag (short for --precision fp16)."""
        return cls.FP16 if fp16 else cls.FP32

    @property
    def half(self) -> bool:
        """fp16: the generator's fp16 blocks and the text tower in float16 (the CUDA recipe)."""
        return self is Precision.FP16

    @property
    def reduced(self) -> bool:
        """fp16 or bf16: some graphs compute in a 16-bit type."""
        return self is not Precision.FP32

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the reduced-precision parts; fp32 parts stay float32."""
        return {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[self]

    @property
    def onnx(self) -> "Precision":
        """The precision of the ONNX files this precision runs: bf16 runs the fp32 graphs, lowered by the runtime."""
        return Precision.FP32 if self is Precision.BF16 else self

    @property
    def suffix(self) -> str:
        """File-name suffix of artifacts in this precision: "" or ".fp16" (synthesis.fp16.onnx); bf16 uses the fp32 files."""
        return ".fp16" if self.half else ""

    @property
    def device_type(self) -> str | None:
        """The one device type this precision runs on ("cuda" for fp16, "cpu" for bf16), or None (fp32: any)."""
        return {Precision.FP16: "cuda", Precision.BF16: "cpu"}.get(self)

    def check_device(self, device: torch.device | str) -> None:
        """ValueError with one line where this precision cannot run on `device`.

        fp16 needs CUDA (eager fp16 on a CPU is slow and not what NVIDIA runs); bf16 needs a CPU with
        bfloat16 instructions (without them it is emulated, slower than fp32); on CUDA use fp16.
        """
        kind = torch.device(device).type
        if self.device_type not in (None, kind):
            raise UsageError("fp16 needs a CUDA device; use fp32 (or bf16 where the CPU has bf16 instructions) on the CPU"
                             if self.half else "bf16 is the CPU's reduced precision here; use fp16 on CUDA")
        if self is Precision.BF16 and not cpu_has_bf16():
            raise UsageError("bf16 needs a CPU with bfloat16 instructions (AVX512_BF16 or AMX), which this one lacks; use fp32")

    def runs_on(self, device: torch.device | str) -> bool:
        try:
            self.check_device(device)
            return True
        except ValueError:
            return False


PRECISIONS = tuple(p.value for p in Precision)
