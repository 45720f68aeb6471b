"""The backend contract: what every way of running the three graphs answers, declares, and how it is made.

    encode(tokens [B, context] int32)                  -> embedding [B, D] float32
    map(embedding [B, D], z [B, z_dim], psi [B])       -> ws [B, num_ws, w_dim] float32
    synthesize(ws [B, num_ws, w_dim])                  -> image [B, H, W, C] uint8
    full(tokens, z, psi)                               -> (ws, image), the three in a row
    __call__(tokens, z, psi)                           -> image

`Backend` is an abstract base class: encode, map and synthesize are abstract, full and __call__ chain them. Torch
tensors in, torch tensors out, on the backend's device. The exported-graph backends allocate their output buffers once
per graph and batch size and return those buffers, and so does torch-cudagraph's `full` (its captured graph's outputs):
such a result is valid until the next call of that graph with the same batch size (copy it to keep it). `torch` and
`torch-compile` (which clones its compiled outputs) return tensors of their own.

Every backend is made one way, `Cls(models, device, precision, artifacts=None, memory_format="nchw")`: the
exported-graph backends check `artifacts` against the models (or export the graphs into the cache first, where they
export on demand), the others ignore it. Each declares what it can do as class attributes (`devices`, `precisions`,
`auto_rank`, `noise_modes`, `memory_formats`, `modules`, `install`, `any_text_tower`, `stage_timing`, ...); callers
ask it, they never test its type, and the backend tables of README.md and docs/backends.md are made from them
(`t2f.engine.backends.docs`). `check_available(device, precision, artifacts, noise_mode, memory_format, models)`
refuses with one line (BackendUnavailable) before any work. A backend class is registered by `@register`
(`registry`) in its own file. A backend never moves, casts or re-lays out the modules it is given: it copies what it
must change (`t2f.devices.placed`).
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch

from t2f.artifacts import check_artifacts
from t2f.devices import cpu_threads, importable  # noqa: F401  (cpu_threads re-exported)
from t2f.errors import UsageError
from t2f.precision import Precision
from t2f.specs import GraphSpec, compute_precisions, graph_specs

from .types import BackendUnavailable, Models  # noqa: F401  (re-exported)

# The synthesis network's activation layouts: "nchw" (PyTorch's default) or "channels_last" (NHWC in memory).
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


class Backend(abc.ABC):
    name = "base"
    description = ""                # what runs, one line for the docs' backend table
    devices: tuple[str, ...] = ("cpu", "cuda")      # device types it runs on
    precisions: tuple[Precision, ...] = (Precision.FP32, Precision.FP16)
    auto_rank: dict[str, dict[Precision, int]] = {}     # where `auto` tries it, per device type and precision: lower
                                    # first (the built-ins use 10 to 70, so a new backend can go between); a device or
                                    # precision it does not list, auto never picks there (torch-compile: anywhere)
    noise_modes: tuple[str, ...] = ("const",)      # exported graphs hold constant noise
    memory_formats: tuple[str, ...] = ("nchw",)    # activation layouts (MEMORY_FORMATS) it runs the synthesis in
    modules: tuple[str, ...] = ()                  # Python packages it needs
    install = ""                    # how to install them, as its refusal and the docs say it
    stage_timing = "graph"          # what t2f-bench's per-stage columns time: "graph" (each stage's own graph or
                                    # eager module, as `full` runs it) or "eager" (eager twins of a captured pipeline)
    separate_uint8 = False          # True: synthesize_float(ws) + to_uint8 are separate steps (eager PyTorch)
    uses_artifacts = False          # runs exported graphs (from an artifact directory)
    exports_on_demand = False       # exports its ONNX graphs into the cache when no artifacts are given
    any_text_tower = False          # also runs text towers t2f's exportable rewrite cannot express (open_clip's own
                                    # encode_text); False: only those `t2f.graphs.text_tower` reads
    min_batch = 1                   # smallest batch one call runs (engines' profiles; a smaller one is padded up to it)
    max_batch = 1 << 30             # largest batch one call takes (engines have a profile)

    def __init__(self, models: Models, device: torch.device, precision: Precision, artifacts: str | Path | None = None,
                 memory_format: str = "nchw"):
        """memory_format is one of its `memory_formats` (check_available has refused any other). A subclass keeps
        what it runs, never `models` itself: a pipeline's eager models are freed where nothing runs them."""
        self.device, self.precision, self.memory_format = device, precision, memory_format
        self.graph_precisions = compute_precisions(precision)   # what each graph runs in: each spec's compute precision
        self.text_encoder_source: str | None = None     # what runs the text tower where t2f's rewrite does not (else None)
        self.runs_given_generator = False   # True: it runs the caller's own synthesis network (eager, on its device)
        self.runs_given_text_tower = False  # True: it runs on the caller's own CLIP text weights (eager, on their device)

    # --- what it can do ---------------------------------------------------------

    @classmethod
    def check_available(cls, device: torch.device, precision: Precision, artifacts: str | Path | None = None,
                        noise_mode: str = "const", memory_format: str = "nchw", models: Models | None = None) -> None:
        """BackendUnavailable with one line, before any work, where this backend cannot run as asked (and, given
        `models`, where it cannot run their text tower: said first, as it holds in every precision and device)."""
        if models is not None and not cls.any_text_tower:
            from t2f.graphs import UnsupportedTextTower, text_tower

            try:
                text_tower(models.clip)
            except UnsupportedTextTower as e:
                raise BackendUnavailable(f"{cls.name} runs t2f's exportable text encoder only: {e}") from None
        if device.type not in cls.devices:
            raise BackendUnavailable(f"{cls.name} needs a CUDA device" if cls.devices == ("cuda",) else
                                     f"{cls.name} runs on the CPU only" if cls.devices == ("cpu",) else
                                     f"{cls.name} runs on {' or '.join(cls.devices)}, not {device.type}")
        if precision not in cls.precisions:
            raise BackendUnavailable(f"{cls.name} runs in {' or '.join(map(str, cls.precisions))}, not {precision}")
        try:
            precision.check_device(device)
        except ValueError as e:
            raise BackendUnavailable(str(e)) from None
        if noise_mode not in cls.noise_modes:
            raise BackendUnavailable(f"noise mode {noise_mode} needs --backend torch (exported graphs use constant noise)")
        if memory_format not in cls.memory_formats:
            raise BackendUnavailable(f"{cls.name} runs the synthesis in {' or '.join(cls.memory_formats)} only, not "
                                     f"{memory_format} (the torch backends run both)")
        missing = [m for m in cls.modules if not importable(m)]
        if missing:
            raise BackendUnavailable(f"{cls.name} needs the Python package {missing[0]}, which is not installed (or does not import)"
                                     + (f" ({cls.install})" if cls.install else ""))
        if cls.uses_artifacts and artifacts is None and not cls.exports_on_demand:
            raise BackendUnavailable(f"--backend {cls.name} needs --artifacts DIR with engines made by t2f-export")
        cls.check_runtime(device, precision)

    @classmethod
    def check_runtime(cls, device: torch.device, precision: Precision) -> None:
        """The backend's own checks of its runtime (providers, plugins); BackendUnavailable where it cannot run."""

    # --- running ----------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, context] int32 -> embedding [B, D] float32, L2-normalized."""

    @abc.abstractmethod
    def map(self, embedding: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """embedding [B, D], z [B, z_dim], psi [B] -> truncated ws [B, num_ws, w_dim] float32."""

    @abc.abstractmethod
    def synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        """ws [B, num_ws, w_dim] -> image [B, H, W, C] uint8."""

    def __call__(self, tokens: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return self.full(tokens, z, psi)[1]

    def full(self, tokens: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws, image) of the whole pipeline; backends with a captured graph replay it here."""
        ws = self.map(self.encode(tokens), z, psi)
        return ws, self.synthesize(ws)


class ArtifactBackend(Backend):
    """Runs exported graphs by spec: subclasses implement _run(spec, feeds) -> output tensor.

    Made on `artifacts` (checked against the models and the precision: `self.manifest`, `self.specs`), or, where it
    exports on demand and none are given, on the ONNX graphs exported into the cache once (their layout is NCHW).
    """

    uses_artifacts = True
    specs: dict[str, GraphSpec]

    def __init__(self, models: Models, device: torch.device, precision: Precision, artifacts: str | Path | None = None,
                 memory_format: str = "nchw"):
        super().__init__(models, device, precision, artifacts, memory_format)
        if artifacts is None and self.exports_on_demand:
            from .ondemand import ensure_onnx

            artifacts = ensure_onnx(models, precision)
        if artifacts is None:
            raise BackendUnavailable(f"--backend {self.name} needs --artifacts DIR with engines made by t2f-export")
        self.artifacts = Path(artifacts)
        self.manifest = check_artifacts(self.artifacts, *models, precision, error=BackendUnavailable)
        self.specs = graph_specs(self.manifest.dims)

    @abc.abstractmethod
    def _run(self, spec: GraphSpec, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph of `spec` on `feeds` (input name -> tensor): its output."""

    def encode(self, tokens):
        return self._run(self.specs["text_encoder"], {"tokens": tokens.to(torch.int32)})

    def map(self, embedding, z, psi):
        return self._run(self.specs["mapper"], {"embedding": embedding.float(), "z": z.float(), "psi": psi.float()})

    def synthesize(self, ws):
        return self._run(self.specs["synthesis"], {"ws": ws.float()})


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows (a short block, or a batch below a profile's minimum)."""
    missing = rows - tensor.shape[0]
    return tensor if missing <= 0 else torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def runnable_batch(batch: int, min_batch: int, max_batch: int) -> int:
    """The batch an engine runs for `batch` rows: padded up to its profile's minimum; ValueError above its maximum."""
    if batch > max_batch:
        raise UsageError(f"batch {batch} is above the engines' profile (at most {max_batch}); re-export with a larger --batch")
    return max(batch, min_batch)
