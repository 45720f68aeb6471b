"""Compute precision: one small type, parsed once per command and passed down as a value.

`Precision.FP32` runs everything in float32. `Precision.FP16` runs CLIP's text tower in half
precision (LayerNorm and softmax in fp32) and the generator's `num_fp16_res` highest
resolutions in half precision; the mapper, the ws and the demodulation stay in fp32. It is a
`str` enum, so it compares equal to "fp32" / "fp16" and is written to JSON as that string.
"""

from __future__ import annotations

import enum

import torch


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: "str | Precision") -> "Precision":
        """ "fp32" / "fp16" (or a Precision) -> Precision; ValueError naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"precision must be one of {', '.join(p.value for p in cls)}, got {value!r}") from None

    @classmethod
    def from_flag(cls, fp16: bool) -> "Precision":
        """t2f-export's --fp16 flag (the card's spelling)."""
        return cls.FP16 if fp16 else cls.FP32

    @property
    def half(self) -> bool:
        return self is Precision.FP16

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the half-precision parts (fp16 blocks, the text tower); fp32 parts stay float32."""
        return torch.float16 if self.half else torch.float32

    @property
    def suffix(self) -> str:
        """File-name suffix of artifacts in this precision: "" or ".fp16" (synthesis.fp16.onnx)."""
        return ".fp16" if self.half else ""

    def check_device(self, device: torch.device | str) -> None:
        """fp16 needs a CUDA device: ValueError otherwise (eager fp16 on a CPU is slow and not what NVIDIA runs)."""
        if self.half and torch.device(device).type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use fp32 on the CPU")

    def runs_on(self, device: torch.device | str) -> bool:
        try:
            self.check_device(device)
            return True
        except ValueError:
            return False


PRECISIONS = tuple(p.value for p in Precision)
