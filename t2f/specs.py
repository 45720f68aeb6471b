"""One spec per exported graph: everything about it that the exporter, the TensorRT builder, the manifest check,
parity and the backends read.

`graph_specs(dims)` gives the three, in pipeline order, for models of these sizes (`t2f.graphs.ModelDims`). A spec
says the graph's input and output names, dtypes and shapes, its dynamic axes, TensorRT profile and artifact file name;
its subclass (`TextEncoderSpec`, `MapperSpec`, `SynthesisSpec`) builds its module and example inputs, computes eager
PyTorch's reference output and says which parity metrics (`t2f.accuracy`) and bounds apply to it. Nothing else in
t2f switches on a graph's name.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .accuracy import accuracy
from .graphs import MapperGraph, ModelDims, SynthesisGraph, TextEncoderGraph, example_tokens
from .mapper import Mapper
from .precision import Precision
from .stylegan2 import to_uint8
from .types import StyleGenerator


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]          # without the leading (dynamic) batch dimension


@dataclasses.dataclass(frozen=True)
class GraphSpec(abc.ABC):
    """One exported graph: its interface (names, dtypes, shapes, dynamic axes, profile, file name) and, in a subclass
    of its own, what is particular to it:

        module(generator, clip, mapper, precision)              its module for export (on the models' device)
        example_inputs(batch, seed, generator, clip, mapper)    fresh valid inputs on the CPU, the same for one seed
        reference(inputs, generator, clip, mapper)              eager PyTorch fp32's float output: parity's reference
        parity_metrics(outputs, reference), parity_ok(...)      the parity metrics that apply to it, and its bounds
    """

    name: ClassVar[str]                     # "text_encoder", "mapper" or "synthesis"
    quantity: ClassVar[str]                 # what its float output is among t2f.accuracy's quantities
    fp32_only: ClassVar[bool] = False       # runs in fp32 whatever the precision (the mapper)
    float_output: ClassVar[bool] = False    # parity reads a float output before the graph's uint8 conversion, which a
                                            # parity runner adds as a second output (the synthesis' float image)
    inputs: tuple[TensorSpec, ...]
    output: TensorSpec

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [self.output.name]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """A dynamic batch on every input and output, nothing else."""
        return {name: {0: "batch"} for name in self.input_names + self.output_names}

    def file_name(self, precision: Precision, ext: str = "onnx") -> str:
        return artifact_name(self.name, precision, ext)

    @classmethod
    def compute_precision(cls, precision: Precision) -> Precision:
        """What the graph computes in when the pipeline runs in `precision` (fp32 where it is fp32_only)."""
        return Precision.FP32 if cls.fp32_only else Precision.parse(precision)

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.output.shape)

    def profile(self, batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT optimization-profile shapes (min, opt, max) of each input for a (min, opt, max) batch."""
        return {t.name: tuple((b, *t.shape) for b in batch) for t in self.inputs}

    @abc.abstractmethod
    def module(self, generator: StyleGenerator, clip, mapper: Mapper, precision: Precision) -> nn.Module: ...

    @abc.abstractmethod
    def example_inputs(self, batch: int, seed: int, generator: StyleGenerator, clip, mapper: Mapper) -> tuple[torch.Tensor, ...]: ...

    @abc.abstractmethod
    def reference(self, inputs: tuple[torch.Tensor, ...], generator: StyleGenerator, clip, mapper: Mapper) -> torch.Tensor: ...

    def parity_metrics(self, outputs: list, reference: torch.Tensor) -> dict:
        """The graph's outputs (its float output last) against `reference`: relative_error, then what applies to it."""
        metrics = accuracy({self.quantity: outputs[-1]}, {self.quantity: reference})
        return dict(relative_error=metrics.pop(f"{self.quantity}_relative_error"), **metrics)

    def parity_ok(self, row: dict, compute: Precision, bound: float, bf16_bounds: dict) -> bool:
        """Whether a parity row passes: its relative error within `bound` (and this graph's own bounds)."""
        return row["relative_error"] <= bound


class TextEncoderSpec(GraphSpec):
    name, quantity = "text_encoder", "embedding"

    def module(self, generator, clip, mapper, precision):
        return TextEncoderGraph(clip, precision)

    def example_inputs(self, batch, seed, generator, clip, mapper):
        return (example_tokens(clip, batch, seed),)

    def reference(self, inputs, generator, clip, mapper):
        with torch.no_grad():                   # open_clip's own encode_text: what the rewrite must equal
            return clip.text_encoder(inputs[0].long())

    def parity_metrics(self, outputs, reference):
        metrics = super().parity_metrics(outputs, reference)
        return dict(relative_error=metrics["relative_error"], cosine=metrics["embedding_cosine"])

    def parity_ok(self, row, compute, bound, bf16_bounds):
        """bf16: also every row's embedding cosine to fp32's within its bound."""
        cosine_ok = compute is not Precision.BF16 or row["cosine"] >= bf16_bounds["text_encoder_cosine"]
        return super().parity_ok(row, compute, bound, bf16_bounds) and cosine_ok


class MapperSpec(GraphSpec):
    name, quantity, fp32_only = "mapper", "ws", True

    def module(self, generator, clip, mapper, precision):
        return MapperGraph(mapper, generator.w_avg)

    def example_inputs(self, batch, seed, generator, clip, mapper):
        g = torch.Generator().manual_seed(seed)             # unit embeddings, normal z, psi in [0.5, 1)
        embedding = F.normalize(torch.randn([batch, mapper.config.embed_dim], generator=g), dim=-1)
        return (embedding, torch.randn([batch, mapper.z_dim], generator=g), 0.5 + 0.5 * torch.rand([batch], generator=g))

    def reference(self, inputs, generator, clip, mapper):
        with torch.no_grad():
            return MapperGraph(mapper, generator.w_avg)(*inputs)


class SynthesisSpec(GraphSpec):
    name, quantity, float_output = "synthesis", "float_image", True

    def module(self, generator, clip, mapper, precision):
        return SynthesisGraph(generator, precision)

    def example_inputs(self, batch, seed, generator, clip, mapper):
        z = torch.randn([batch, generator.z_dim], generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():                   # mapped and truncated ws
            return (generator.mapping(z.to(generator.w_avg.device), truncation_psi=0.7).cpu(),)

    def reference(self, inputs, generator, clip, mapper):
        with torch.no_grad():                   # the generator's own synthesis network, float NCHW
            return generator.synthesis(inputs[0], noise_mode="const")

    def parity_metrics(self, outputs, reference):
        """outputs [uint8 image, float image]: also the uint8 images' difference from eager's."""
        return dict(super().parity_metrics(outputs, reference), **accuracy({"image": outputs[0]}, {"image": to_uint8(reference)}))

    def parity_ok(self, row, compute, bound, bf16_bounds):
        """fp32: also the uint8 image within one level of eager's; bf16: the mean uint8 difference within its bound."""
        limits = {Precision.FP32: ("uint8_max_diff", 1), Precision.BF16: ("uint8_mean_diff", bf16_bounds["uint8_mean"])}
        key, limit = limits.get(compute, ("relative_error", bound))
        return super().parity_ok(row, compute, bound, bf16_bounds) and row[key] <= limit


def artifact_name(graph: str, precision: Precision, ext: str = "onnx") -> str:
    """An artifact's file name: synthesis.onnx, synthesis.fp16.onnx, synthesis.fp16.plan, ..."""
    return f"{graph}{Precision.parse(precision).suffix}.{ext}"


SPEC_CLASSES: tuple[type[GraphSpec], ...] = (TextEncoderSpec, MapperSpec, SynthesisSpec)     # in pipeline order


def compute_precisions(precision: Precision) -> dict[str, Precision]:
    """graph -> what it computes in when the pipeline runs in `precision` (the mapper: fp32), from each spec."""
    return {cls.name: cls.compute_precision(precision) for cls in SPEC_CLASSES}


def graph_specs(dims: ModelDims) -> dict[str, GraphSpec]:
    """The three graph specs for models of these sizes, in pipeline order."""
    return {
        "text_encoder": TextEncoderSpec((TensorSpec("tokens", torch.int32, (dims.context_length,)),),
                                        TensorSpec("embedding", torch.float32, (dims.embed_dim,))),
        "mapper": MapperSpec((TensorSpec("embedding", torch.float32, (dims.embed_dim,)), TensorSpec("z", torch.float32, (dims.z_dim,)),
                              TensorSpec("psi", torch.float32, ())),
                             TensorSpec("ws", torch.float32, (dims.num_ws, dims.w_dim))),
        "synthesis": SynthesisSpec((TensorSpec("ws", torch.float32, (dims.num_ws, dims.w_dim)),),
                                   TensorSpec("image", torch.uint8, (dims.resolution, dims.resolution, dims.img_channels))),
    }
