"""PyTorch backends: eager, one CUDA graph of the whole pipeline, and torch.compile (Inductor).

    torch             eager PyTorch in fp32, fp16 (CUDA) or bf16 (CPU); every noise mode
    torch-cudagraph   fp16, tokens -> uint8 image captured as one CUDA graph per batch size
    torch-compile     the whole pipeline (tokens -> ws, uint8 image) compiled as one function by torch.compile
                      (Inductor), each stage as one more for encode / map / synthesize; static shapes per block size;
                      on CUDA with CUDA graphs (mode "reduce-overhead"); Inductor's caches in t2f's cache directory

All three run the same stage modules (t2f.graphs): one recipe per stage and precision, the synthesis in NCHW or
channels_last (`memory_format`). `torch` also runs the text towers t2f's exportable rewrite cannot express
(`t2f.graphs.text_tower`) with open_clip's own encode_text; the other two refuse them (`any_text_tower`). None of them moves, casts or re-lays out the modules it is given: the stage modules
are copies, and eager PyTorch's synthesis network is the caller's own only where it is on the device already
(`t2f.devices.placed`).

torch-compile and CUDA graph trees: with mode "reduce-overhead" Inductor replays CUDA graphs from a tree per device,
and a compiled call's outputs live in that tree's memory pool until a later compiled call starts a new generation
(every call of a compiled function does), which frees or overwrites them. Stages compiled apart and fed into each
other would read overwritten inputs. So `full` is one compiled function (no intermediate leaves it), and every
compiled call's outputs are cloned and the originals dropped before the call returns: what a caller gets is its own,
a stage's output can feed the next stage, and the tree finds the previous call's outputs dead, so each call starts
from a root graph. `torch.compiler.cudagraph_mark_step_begin()` is not called: once called, CUDA graph trees count
generations by that call alone, process-wide, which would change how the caller's own compiled models are freed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading

import torch
from torch import nn

from t2f.devices import importable, on_device, pin_cuda_numerics, placed
from t2f.graphs import MapperGraph, SynthesisGraph, TextEncoderGraph, UnsupportedTextTower, example_tokens, text_tower
from t2f.precision import Precision
from t2f.stylegan2 import NOISE_MODES, to_uint8

from .base import MEMORY_FORMATS, Backend, BackendUnavailable, Models
from .registry import register

FP32, FP16, BF16 = Precision.FP32, Precision.FP16, Precision.BF16


class PipelineGraph(nn.Module):
    """tokens [B, context] int32, z [B, z_dim], psi [B] -> (ws [B, num_ws, w_dim] float32, image [B, H, W, C] uint8):
    the three stage modules in a row, as torch-cudagraph captures it and torch-compile compiles it."""

    def __init__(self, text: nn.Module, mapper: nn.Module, synthesis: nn.Module):
        super().__init__()
        self.text, self.mapper, self.synthesis = text, mapper, synthesis

    def forward(self, tokens: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ws = self.mapper(self.text(tokens), z, psi)
        return ws, self.synthesis(ws)


class _StageModules(Backend):
    """The text encoder and mapper modules on the device (the text encoder in the backend's precision), with the one
    eager recipe of each; subclasses add their synthesis. `artifacts` is not used."""

    memory_formats = tuple(MEMORY_FORMATS)

    def _stages(self, models: Models, device: torch.device, precision: Precision, synthesis: bool = True):
        if device.type == "cuda":
            pin_cuda_numerics()
        self.text = self._text_encoder(models.clip, device, precision)
        self.mapper = MapperGraph(models.mapper, models.generator.w_avg).to(device)
        if synthesis:
            self.synthesis = SynthesisGraph(models.generator, precision, memory_format=MEMORY_FORMATS[self.memory_format]).to(device)
            self.pipeline = PipelineGraph(self.text, self.mapper, self.synthesis)
        self.context, self.z_dim = models.clip.context_length, models.mapper.z_dim

    def _text_encoder(self, clip, device: torch.device, precision: Precision) -> torch.nn.Module:
        return TextEncoderGraph(clip, precision).to(device)

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
        text = clip.only("text")
        placed_text = text.on(device)
        self.encoder = placed_text.text_encoder            # the caller's text tower where it is on the device, else a copy
        self.shares = placed_text is text                   # True: the caller's own text tower
        autocast = precision.reduced and torch.amp.is_autocast_available(device.type)
        self.precision = precision if autocast else Precision.FP32

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(tokens.device.type, dtype=self.precision.dtype, enabled=self.precision.reduced):
            return self.encoder(tokens.long()).float()


@register
class TorchBackend(_StageModules):
    """Eager PyTorch: the text-encoder graph module (or open_clip's own text encoder where that rewrite does not
    apply), the mapper, the synthesis network (the caller's own where it is on the device), then the uint8 conversion."""

    name = "torch"
    description = "eager PyTorch; every noise mode"
    precisions = (FP32, FP16, BF16)
    auto_rank = {"cpu": {FP32: 40, BF16: 50}, "cuda": {FP16: 40, FP32: 70}}
    noise_modes = NOISE_MODES
    separate_uint8 = True
    any_text_tower = True

    def _text_encoder(self, clip, device, precision):
        """The text-encoder graph, on the caller's own text weights where they are fp32 on the device and it runs fp32
        (held once), else on copies; open_clip's own encoder where the rewrite does not apply."""
        try:
            if precision is FP32 and all(on_device(t.device, device) and t.dtype == torch.float32 for t in text_tower(clip).tensors()):
                self.runs_given_text_tower = True
                return TextEncoderGraph(clip, precision, share=True)
            return super()._text_encoder(clip, device, precision)
        except UnsupportedTextTower:
            encoder = OpenClipTextEncoder(clip, device, precision)
            self.runs_given_text_tower = encoder.shares
            self.graph_precisions["text_encoder"] = encoder.precision
            self.text_encoder_source = "open_clip's own encode_text" + (" (autocast)" if encoder.precision.reduced else "")
            return encoder

    def __init__(self, models, device, precision, artifacts=None, memory_format="nchw"):
        super().__init__(models, device, precision, artifacts, memory_format)
        self._stages(models, device, precision, synthesis=False)
        self.synthesis = placed(models.generator.synthesis, device)    # the caller's own where it is on the device already
        self.runs_given_generator = self.synthesis is models.generator.synthesis
        self.layout = MEMORY_FORMATS[memory_format]

    @torch.no_grad()
    def synthesize_float(self, ws, noise_mode: str = "const", noise_seeds: list[int] | None = None):
        return self.synthesis(ws.to(self.device), noise_mode=noise_mode, precision=self.precision, noise_seeds=noise_seeds,
                              memory_format=self.layout)

    @torch.no_grad()
    def synthesize(self, ws, noise_mode: str = "const", noise_seeds: list[int] | None = None):
        """uint8 images; noise_mode "random" draws row r's noise from its own generator seeded with noise_seeds[r]."""
        return to_uint8(self.synthesize_float(ws, noise_mode, noise_seeds))


@register
class CudaGraphBackend(_StageModules):
    """fp16; tokens -> uint8 image captured as one CUDA graph per batch size (launch overhead gone).

    `encode`, `map` and `synthesize` run the same modules eagerly (stage_timing "eager"); `full` replays the graph
    and returns its output buffers (valid until the next call at that batch size).
    """

    name = "torch-cudagraph"
    description = "tokens -> text encoder -> mapper -> synthesis -> uint8, captured as one CUDA graph per batch size"
    devices = ("cuda",)
    precisions = (FP16,)
    auto_rank = {"cuda": {FP16: 20}}
    stage_timing = "eager"

    def __init__(self, models, device, precision, artifacts=None, memory_format="nchw"):
        super().__init__(models, device, precision, artifacts, memory_format)
        self._stages(models, device, precision)
        self.graphs: dict[int, tuple] = {}
        # A valid token row for the captures, made here, the one backend that needs one: made on first capture it
        # would keep the caller's CLIP alive with the backend (it needs CLIP's tokenizer and text tower).
        self._example_row = example_tokens(models.clip, 1, 0)                   # [1, context] int32, any valid row

    def _example(self, batch: int):
        tokens = self._example_row.repeat(batch, 1).to(self.device)
        return tokens, torch.zeros([batch, self.z_dim], device=self.device), torch.ones([batch], device=self.device)

    @torch.no_grad()
    def _graph(self, batch: int):
        if batch not in self.graphs:
            with torch.cuda.device(self.device):                # capture streams and pools belong to self.device
                tokens, z, psi = self._example(batch)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):                  # warm-up: kernels chosen, allocator primed
                        self.pipeline(tokens, z, psi)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = self.pipeline(tokens, z, psi)
            self.graphs[batch] = (graph, (tokens, z, psi), outputs)
        return self.graphs[batch]

    def full(self, tokens, z, psi):
        graph, inputs, (ws, image) = self._graph(tokens.shape[0])
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
    """Inductor's cache directory for t2f's compiles: $TORCHINDUCTOR_CACHE_DIR if the user set it, else T2F_CACHE/inductor.
    Inductor writes its own default (/tmp/torchinductor_USER) into the variable once it has looked, so that value
    counts as unset. Nothing is written into the environment here (see `inductor_environment`)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from t2f.download import cache_dir
    from t2f.private import private_dir

    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path or os.path.abspath(path) == os.path.abspath(default_cache_dir()):
        path = str(cache_dir() / "inductor")
    private_dir(path, fix="set T2F_CACHE (or TORCHINDUCTOR_CACHE_DIR) to a directory of your own")   # its code runs here
    return path


INDUCTOR_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
_ENVIRONMENT_LOCK = threading.Lock()


@contextlib.contextmanager
def inductor_environment(cache: str):
    """TORCHINDUCTOR_CACHE_DIR=cache inside the block, then INDUCTOR_VARIABLES restored to what they were (removed
    where they were unset): Inductor reads its cache directory from the environment only, and writes both variables
    while it compiles. One block at a time in this process (compiles are serialized by Dynamo anyway); another thread
    that compiles meanwhile without t2f writes into this cache too."""
    with _ENVIRONMENT_LOCK:
        saved = {name: os.environ.get(name) for name in INDUCTOR_VARIABLES}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would call on the CPU ($CXX, else g++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


@register
class TorchCompileBackend(_StageModules):
    """torch.compile: the whole pipeline as one compiled function (`full`), each stage as one more (`encode`, `map`,
    `synthesize`, compiled on their first use); static shapes (one compiled graph per block size), CUDA graphs on a
    GPU, outputs cloned (see the module docstring). The first call at a batch size compiles (seconds to minutes;
    t2f-bench reports it as first_call_ms), with Inductor's cache in `self.cache`; a later process with the same
    models finds it there."""

    name = "torch-compile"
    description = ("the whole pipeline (tokens -> ws and uint8 image) as one function through `torch.compile` (Inductor), "
                   "static shapes, one compiled graph per block size; each stage one more for the modes that call stages "
                   "alone (KNN, image); on CUDA with CUDA graphs (`mode=\"reduce-overhead\"`); Inductor's caches in "
                   "`T2F_CACHE/inductor` (or `$TORCHINDUCTOR_CACHE_DIR`); the CPU needs a C++ compiler")
    precisions = (FP32, FP16, BF16)

    def __init__(self, models, device, precision, artifacts=None, memory_format="nchw"):
        super().__init__(models, device, precision, artifacts, memory_format)
        self._stages(models, device, precision)
        self.cache = inductor_cache()
        self.cudagraphs = device.type == "cuda"
        compile = functools.partial(torch.compile, dynamic=False, fullgraph=True, mode="reduce-overhead" if self.cudagraphs else None)
        with inductor_environment(self.cache):                      # torch.compile itself looks up Inductor's cache
            self.compiled = {"pipeline": compile(self.pipeline), "text_encoder": compile(self.text),
                             "mapper": compile(self.mapper), "synthesis": compile(self.synthesis)}
        self.compiled_shapes: set[tuple] = set()       # (graph, input shapes) already called: later calls do not compile

    @classmethod
    def check_runtime(cls, device, precision):
        if device.type == "cpu" and cxx_compiler() is None:
            raise BackendUnavailable("torch-compile on the CPU needs a C++ compiler (g++ or clang++; Debian: apt-get install g++)")
        if device.type == "cuda" and not importable("triton"):
            raise BackendUnavailable("torch-compile on CUDA needs the triton package")

    def _call(self, graph: str, *inputs: torch.Tensor):
        """The compiled `graph` on `inputs` (on the device, contiguous); its outputs cloned and the originals dropped.
        The first call at each input shape compiles, inside `inductor_environment` (as the torch.compile calls were)."""
        key = (graph, tuple(tuple(t.shape) for t in inputs))
        first = key not in self.compiled_shapes
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), device, inductor_environment(self.cache) if first else contextlib.nullcontext():
            out = self.compiled[graph](*inputs)
            out = tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()
        self.compiled_shapes.add(key)
        return out

    def _floats(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(self.device, torch.float32).contiguous() for t in tensors]

    def full(self, tokens, z, psi):
        return self._call("pipeline", tokens.to(self.device, torch.int32).contiguous(), *self._floats(z, psi))

    def encode(self, tokens):
        return self._call("text_encoder", tokens.to(self.device, torch.int32).contiguous())

    def map(self, embedding, z, psi):
        return self._call("mapper", *self._floats(embedding, z, psi))

    def synthesize(self, ws):
        return self._call("synthesis", *self._floats(ws))
