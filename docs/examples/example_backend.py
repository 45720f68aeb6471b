"""A complete t2f backend in one file: t2f's three graph modules, run eagerly by PyTorch on the CPU in fp32.

Importing this file registers it (`@register`): then `TextToFace(..., backend="example")` runs it. A package makes
it known to every t2f process with an entry point in the group `t2f.backends` that names this module.
"""

import torch

from t2f.engine.backends import Backend, register
from t2f.graphs import MapperGraph, SynthesisGraph, TextEncoderGraph
from t2f.precision import Precision


@register
class ExampleBackend(Backend):
    name = "example"
    description = "t2f's graph modules, run eagerly by PyTorch on the CPU (docs/backends.md's example)"
    devices = ("cpu",)
    precisions = (Precision.FP32,)
    auto_rank = {}                  # auto never picks it; {"cpu": {Precision.FP32: 35}} would try it after onnxruntime

    def __init__(self, models, device, precision, artifacts=None, memory_format="nchw"):
        super().__init__(models, device, precision, artifacts, memory_format)
        # Copies of what it runs: the caller's modules stay as they are, and the pipeline can let go of them.
        self.text = TextEncoderGraph(models.clip, precision)                   # tokens -> embedding
        self.mapper = MapperGraph(models.mapper, models.generator.w_avg)       # embedding, z, psi -> truncated ws
        self.synthesis = SynthesisGraph(models.generator, precision)           # ws -> uint8 image [B, H, W, C]

    @torch.no_grad()
    def encode(self, tokens):
        return self.text(tokens.to(torch.int32))

    @torch.no_grad()
    def map(self, embedding, z, psi):
        return self.mapper(embedding.float(), z.float(), psi.float())

    @torch.no_grad()
    def synthesize(self, ws):
        return self.synthesis(ws.float())
