"""PyTorch backends: eager, one CUDA graph of the whole pipeline, and torch.compile (Inductor).

    torch             eager PyTorch in fp32, fp16 (CUDA) or bf16 (CPU); every noise mode
    torch-cudagraph   fp16, tokens -> uint8 image captured as one CUDA graph per batch size
    torch-compile     each stage through torch.compile (Inductor), static shapes per block size; on CUDA with
                      CUDA graphs (mode "reduce-overhead"); Inductor's caches in t2f's cache directory

All three run the same stage modules (t2f.graphs): one recipe per stage and precision. `torch` also runs
the text towers t2f's exportable rewrite cannot express (`t2f.graphs.text_tower`) with open_clip's own
encode_text; the other two refuse them (`any_text_tower`).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch

from t2f.devices import importable, pin_cuda_numerics
from t2f.graphs import MapperGraph, SynthesisGraph, TextEncoderGraph, UnsupportedTextTower, example_tokens
from t2f.precision import Precision
from t2f.stylegan2 import NOISE_MODES, to_uint8

from .base import Backend, BackendUnavailable, Models


class _StageModules(Backend):
    """The text encoder and mapper modules on the device (the text encoder in the backend's precision), with the one
    eager recipe of each; subclasses add their synthesis."""

    @classmethod
    def create(cls, models, device, precision, artifacts=None):
        return cls(models, device, precision)

    def _stages(self, models: Models, device: torch.device, precision: Precision, synthesis: bool = True):
        if device.type == "cuda":
            pin_cuda_numerics()
        self.text = self._text_encoder(models.clip, device, precision)
        self._example_row = example_tokens(models.clip, 1, 0)                   # [1, context] int32, any valid row
        self.mapper = MapperGraph(models.mapper, models.generator.w_avg).to(device)
        if synthesis:
            self.synthesis = SynthesisGraph(models.generator, precision).to(device)
        self.context, self.z_dim = models.clip.context_length, models.mapper.z_dim
        self.graph_precisions["mapper"] = Precision.FP32

    def _text_encoder(self, clip, device: torch.device, precision: Precision) -> torch.nn.Module:
        return TextEncoderGraph(clip, precision).to(device)

    def _example(self, batch: int):
        tokens = self._example_row.repeat(batch, 1).to(self.device)
        return tokens, torch.zeros([batch, self.z_dim], device=self.device), torch.ones([batch], device=self.device)

    @torch.no_grad()
    def encode(self, tokens):
        return self.text(tokens.to(self.device, torch.int32))

    @torch.no_grad()
    def map(self, embedding, z, psi):
        return self.mapper(embedding.to(self.device), z.to(self.device), psi.to(self.device))


class OpenClipTextEncoder(torch.nn.Module):
    """open_clip's own text encoder (`Clip.text_encoder`: encode_text, normalized) for a text tower the exportable
    rewrite cannot express: tokens -> float32 embedding. In a reduced precision it runs under torch.autocast, the mixed
    precision open_clip itself trains and evaluates in (matrix products reduced, LayerNorm and softmax fp32; the weights
    stay as they are), where autocast runs on the device; else in fp32 (`precision` says which)."""

    def __init__(self, clip, device: torch.device, precision: Precision):
        super().__init__()
        self.encoder = clip.text_encoder            # the caller's model, not a copy
        autocast = precision.reduced and torch.amp.is_autocast_available(device.type)
        self.precision = precision if autocast else Precision.FP32

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(tokens.device.type, dtype=self.precision.dtype, enabled=self.precision.reduced):
            return self.encoder(tokens.long()).float()


class TorchBackend(_StageModules):
    """Eager PyTorch: the text-encoder graph module (or open_clip's own text encoder where that rewrite does not
    apply), the mapper, the synthesis network, then the uint8 conversion."""

    name = "torch"
    precisions = (Precision.FP32, Precision.FP16, Precision.BF16)
    noise_modes = NOISE_MODES
    separate_uint8 = True
    any_text_tower = True

    def _text_encoder(self, clip, device, precision):
        try:
            return super()._text_encoder(clip, device, precision)
        except UnsupportedTextTower:
            encoder = OpenClipTextEncoder(clip, device, precision)
            self.graph_precisions["text_encoder"] = encoder.precision
            self.text_encoder_source = "open_clip's own encode_text" + (" (autocast)" if encoder.precision.reduced else "")
            return encoder

    def __init__(self, models: Models, device: torch.device, precision: Precision):
        super().__init__(device, precision)
        self._stages(models, device, precision, synthesis=False)
        self.clip = models.clip.to(device)
        self.synthesis = models.generator.synthesis.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def synthesize_float(self, ws, noise_mode: str = "const", noise_seeds: list[int] | None = None):
        return self.synthesis(ws.to(self.device), noise_mode=noise_mode, precision=self.precision, noise_seeds=noise_seeds)

    @torch.no_grad()
    def synthesize(self, ws, noise_mode: str = "const", noise_seeds: list[int] | None = None):
        """uint8 images; noise_mode "random" draws row r's noise from its own generator seeded with noise_seeds[r]."""
        return to_uint8(self.synthesize_float(ws, noise_mode, noise_seeds))


class CudaGraphBackend(_StageModules):
    """fp16; tokens -> uint8 image captured as one CUDA graph per batch size (launch overhead gone).

    `encode`, `map` and `synthesize` run the same modules eagerly (stage_timing "eager"); `full` replays the graph.
    """

    name = "torch-cudagraph"
    devices = ("cuda",)
    precisions = (Precision.FP16,)
    stage_timing = "eager"

    def __init__(self, models: Models, device: torch.device, precision: Precision):
        super().__init__(device, precision)
        self._stages(models, device, precision)
        self.graphs: dict[int, tuple] = {}

    def _pipeline(self, tokens, z, psi):
        embedding = self.text(tokens)
        ws = self.mapper(embedding, z, psi)
        return embedding, ws, self.synthesis(ws)

    @torch.no_grad()
    def _graph(self, batch: int):
        if batch not in self.graphs:
            with torch.cuda.device(self.device):                # capture streams and pools belong to self.device
                tokens, z, psi = self._example(batch)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):                  # warm-up: kernels chosen, allocator primed
                        self._pipeline(tokens, z, psi)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = self._pipeline(tokens, z, psi)
            self.graphs[batch] = (graph, (tokens, z, psi), outputs)
        return self.graphs[batch]

    def full(self, tokens, z, psi):
        graph, inputs, (_, ws, image) = self._graph(tokens.shape[0])
        for buffer, value in zip(inputs, (tokens, z, psi)):
            buffer.copy_(value, non_blocking=True)
        with torch.cuda.device(self.device):
            graph.replay()
        return ws, image

    @torch.no_grad()
    def synthesize(self, ws):
        return self.synthesis(ws.to(self.device))


# ----------------------------------------------------------------------------
# torch.compile.


def inductor_cache() -> str:
    """Inductor's cache directory: $TORCHINDUCTOR_CACHE_DIR if the user set it, else T2F_CACHE/inductor (set for this
    process). Inductor writes its own default (/tmp/torchinductor_USER) into the variable once it has looked, so that
    value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from t2f.download import cache_dir
    from t2f.private import private_dir

    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path or os.path.abspath(path) == os.path.abspath(default_cache_dir()):
        path = str(cache_dir() / "inductor")
    private_dir(path, fix="set T2F_CACHE (or TORCHINDUCTOR_CACHE_DIR) to a directory of your own")   # its code runs here
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path           # read by Inductor when it first compiles
    return path


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would call on the CPU ($CXX, else g++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


class TorchCompileBackend(_StageModules):
    """Each stage through torch.compile: static shapes (one compiled graph per block size), Inductor's caches in
    t2f's cache directory, CUDA graphs on a GPU. The first call at a batch size compiles (seconds to minutes;
    t2f-bench reports it as first_call_ms); a later process with the same models finds Inductor's cache."""

    name = "torch-compile"
    precisions = (Precision.FP32, Precision.FP16, Precision.BF16)

    def __init__(self, models: Models, device: torch.device, precision: Precision):
        super().__init__(device, precision)
        self._stages(models, device, precision)
        self.cache = inductor_cache()
        mode = "reduce-overhead" if device.type == "cuda" else None
        compile = lambda m: torch.compile(m, dynamic=False, fullgraph=True, mode=mode)      # noqa: E731
        self._text, self._mapper, self._synthesis = compile(self.text), compile(self.mapper), compile(self.synthesis)

    @classmethod
    def check_runtime(cls, device, precision):
        if device.type == "cpu" and cxx_compiler() is None:
            raise BackendUnavailable("torch-compile on the CPU needs a C++ compiler (g++ or clang++; Debian: apt-get install g++)")
        if device.type == "cuda" and not importable("triton"):
            raise BackendUnavailable("torch-compile on CUDA needs the triton package")

    def _call(self, fn, *args):
        with torch.no_grad(), torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return fn(*args)

    def encode(self, tokens):
        return self._call(self._text, tokens.to(self.device, torch.int32).contiguous())

    def map(self, embedding, z, psi):
        return self._call(self._mapper, embedding.to(self.device).float().contiguous(), z.to(self.device).float().contiguous(),
                          psi.to(self.device).float().contiguous())

    def synthesize(self, ws):
        return self._call(self._synthesis, ws.to(self.device).float().contiguous())
