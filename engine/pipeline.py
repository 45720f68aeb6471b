"""Text -> faces on any backend: CLIP text encoder -> mapper -> StyleGAN2 synthesis, in text, KNN and image modes."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch

from t2f.bank import Bank, check_bank, knn_condition
from t2f.clip import Clip
from t2f.devices import resolve_device
from t2f.latents import seeded_latents
from t2f.errors import UsageError
from t2f.mapper import Mapper
from t2f.precision import Precision
from t2f.stylegan2 import NOISE_MODES
from t2f.types import StyleGenerator

from .backends import MEMORY_FORMATS, BackendUnavailable, Models, make_backend, pad_rows
from .prompts import as_prompts, check_images, check_sampling


class DeviceFallbackWarning(UserWarning):
    """--device auto found a GPU on which the chosen backend cannot run, and runs it on the CPU instead."""


# ----------------------------------------------------------------------------
# Pure functions.


def sample_z(seed: int, num_prompts: int, n: int, z_dim: int) -> torch.Tensor:
    """Mapper latents [num_prompts * n, z_dim], prompt-major, one seeded stream per image.

    Image j of prompt i draws from numpy's generator seeded with (seed, i, j), on the CPU:
    the same seed gives the same latents on every device, and an image's latent does not
    depend on how many prompts or images were asked for.
    """
    return seeded_latents(_keys(seed, num_prompts, n), z_dim)


def check_compatible(generator: StyleGenerator, clip: Clip, mapper: Mapper) -> None:
    """Raise UsageError naming the first dimension on which the three models disagree (or a CLIP without its text tower)."""
    if clip.text_encoder is None:
        raise UsageError(f"CLIP {clip.name} here holds its image tower only (a pipeline's own `clip` where its backend "
                         "runs copies or exported graphs): pass the CLIP itself")
    cfg = mapper.config
    if cfg.embed_dim != clip.embed_dim:
        raise UsageError(f"the mapper expects {cfg.embed_dim}-d CLIP embeddings but CLIP {clip.name} gives {clip.embed_dim}-d")
    if (cfg.w_dim, cfg.num_ws) != (generator.w_dim, generator.num_ws):
        raise UsageError(f"the mapper makes {cfg.num_ws} x {cfg.w_dim} ws but the generator takes {generator.num_ws} x {generator.w_dim}")


# ----------------------------------------------------------------------------
# The pipeline.


MODES = ("text", "knn", "image")


def blocks(rows: int, *tensors: torch.Tensor):
    """Cut tensors [B, ...] into blocks of exactly `rows` rows each: yields (real rows, padded tensors).

    The last block is padded by repeating its last row. A graph called at one fixed row count computes
    each row the same way whatever the rows beside it: GEMM and convolution kernels pick their
    algorithm, blocking and reduction split from the row count (measured on the CPU: a row computed
    with 1 to 3 rows differs from the same row computed with 4 or more, ws by ~1e-6, images by one level).
    """
    for start in range(0, tensors[0].shape[0], rows):
        chunk = [t[start : start + rows] for t in tensors]
        yield chunk[0].shape[0], [pad_rows(c, rows) for c in chunk]


def default_batch_size(device: torch.device) -> int:
    """Rows per graph call where none is given: 1 on the CPU, 8 on a GPU.

    On the CPU batching does not pay for a real generator (measured on 2 cores: a 256-px generator
    made 2.5 images/s one at a time and 0.8 in blocks of 8), and blocks of one row need no padding.
    """
    return 1 if torch.device(device).type == "cpu" else 8


def noise_seed(seed: int, i: int, j: int) -> int:
    """Seed of image j of row i's noise in "random" mode."""
    return int(np.random.SeedSequence([int(seed), int(i), int(j), 2]).generate_state(1, np.uint64)[0]) >> 1   # int first: numpy 1.x has no uint64 >> int


@dataclasses.dataclass
class Faces:
    images: torch.Tensor          # [rows * n, H, W, C] uint8 on the CPU, row-major.
    ws: torch.Tensor              # [rows * n, num_ws, w_dim] float32 on the CPU, after truncation.
    labels: list[str]             # What each row was conditioned on: its prompt, or its image's path.
    n: int                        # Images per row.


class TextToFace:
    """prompts (or face images) -> faces: `pipe("a smiling woman", n=4)`. Same seed, same images on one device and precision.

    Made by t2f.engine.load_pipeline (which sets `sources`), or from loaded models.

    Each model is held once: the pipeline keeps the models it was given only where its backend runs them (eager
    PyTorch: `generator` is the caller's where the generator is on the device, `clip` the caller's where its text tower
    is fp32 there and the precision fp32). Every other backend holds what it runs (its own copies on the device, or
    exported graphs), and the pipeline keeps the mapper (small), CLIP's tokenizer and image tower (`clip` is
    `Clip.only("image")`, for mode "image") and no generator (`generator` None).

    A row is one condition: a prompt (modes "text" and "knn") or a face image (mode "image").
    Image j of row i depends only on (seed, i, j) and the condition, not on how many were asked for:
    every graph runs on blocks of exactly `batch_size` rows (see `blocks`), so for one batch_size,
    backend, device and precision a row is bit for bit the same alone or beside any other rows.
    """

    sources = None          # t2f.sources.Resolved: the mapper, generator and CLIP load_pipeline loaded (None if made directly).

    def __init__(self,
        generator: StyleGenerator,
        clip: Clip,
        mapper: Mapper,
        device: str | torch.device = "auto",   # "auto" = the best that works here: CUDA when available and the backend runs there, else cpu.
        precision: Precision | None = Precision.FP32,  # None = the chosen backend's fastest accurate precision here (see
                                                # backends.choose); FP16 (CUDA) / BF16 (CPU with bf16 instructions).
        batch_size: int | None = None,          # Rows per graph call, always (a short last block is padded): bounds memory,
                                                # and a row's result depends on it but never on the rows beside it.
                                                # None = default_batch_size(the device).
        bank: Bank | None = None,               # Embedding bank for mode "knn".
        backend: str = "torch",                 # "torch", "torch-compile", "onnxruntime", "openvino", ... or "auto".
        artifacts: str | None = None,           # t2f-export output for the exported-graph backends (exported to the cache if None).
        noise_mode: str = "const",              # The noise mode the runs will use: "auto" picks a backend that supports it.
        memory_format: str = "nchw",            # The synthesis' activation layout: "nchw" or "channels_last" (torch backends).
    ):
        """The models are used as given, never moved, cast or switched to eval: the backend copies what it needs on
        another device, and mode "image" copies CLIP's image tower to the device on first use where it is elsewhere."""
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        if memory_format not in MEMORY_FORMATS:
            raise UsageError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
        check_compatible(generator, clip, mapper)
        if bank is not None:
            check_bank(bank, clip)
        self.bank = bank
        self.device, self.backend = self._backend(device, precision, backend, Models(generator, clip, mapper), artifacts,
                                                  noise_mode, memory_format)
        self.precision = self.backend.precision
        # What the backend does not run on the caller's own weights it holds as copies or graphs: those are the only ones.
        self.generator = generator if self.backend.runs_given_generator else None
        self.clip = clip if self.backend.runs_given_text_tower else clip.only("image")
        self.mapper = mapper
        self._image_clip = None                 # CLIP's image tower on self.device for mode "image": made on first use
        self.batch_size = min(batch_size or default_batch_size(self.device), self.backend.max_batch)

    @staticmethod
    def _backend(device, precision: Precision | None, name: str, models: Models, artifacts, noise_mode, memory_format):
        """(device, backend): on the requested device; with "auto", on the CPU (with a note) where the backend
        cannot run on the GPU (onnxruntime without a CUDA provider, say)."""
        resolved = resolve_device(device)
        if precision is not None:
            precision = Precision.parse(precision)
            precision.check_device(resolved)
        candidates = [resolved]
        if str(device) == "auto" and resolved.type == "cuda" and (precision is None or precision.runs_on("cpu")):
            candidates.append(torch.device("cpu"))
        for i, dev in enumerate(candidates):
            try:
                return dev, make_backend(name, models, dev, precision, artifacts, noise_mode=noise_mode, memory_format=memory_format)
            except BackendUnavailable as e:
                if i == len(candidates) - 1:
                    raise
                warnings.warn(f"{e}; running on the CPU instead (--device auto)", DeviceFallbackWarning, stacklevel=3)
        raise AssertionError("unreachable")

    @property
    def summary(self) -> str:
        """One line: the backend, device and the precision of each graph ("openvino on cpu, bf16 (mapper fp32)"), and
        what runs the text tower where t2f's rewrite does not ("torch on cpu, fp32 (text_encoder: open_clip's own ...)")."""
        source = self.backend.text_encoder_source
        odd = [f"text_encoder: {source}"] if source else []
        odd += [f"{g} {p}" for g, p in self.backend.graph_precisions.items() if p != self.precision]
        return f"{self.backend.name} on {self.device}, {self.precision}" + (f" ({', '.join(odd)})" if odd else "")

    @torch.no_grad()
    def __call__(self,
        prompt: str | list[str] | None = None,  # A prompt, or a list of them: a row each. Mode "image": optional row labels.
        n: int = 1,                             # Images per row.
        seed: int = 0,                          # Image j of row i depends only on (seed, i, j) and the row's condition.
        truncation_psi: float = 1.0,            # Pull ws toward the generator's w_avg; 1 = none.
        noise_mode: str = "const",              # "const", "random" (seeded per image) or "none".
        mode: str = "text",                     # "text", "knn" (bank combinations near the text) or "image".
        images: torch.Tensor | None = None,     # Mode "image": [rows, 3, H, W] in [-1, 1] (see face_tensor).
        knn: dict | None = None,                # Mode "knn": k, m, alpha (see t2f.bank.knn_condition).
    ) -> Faces:
        """Faces, n per row, row-major: `pipe("a smiling woman", n=4)` gives 4, `pipe(["a", "b"], n=2)` gives 4.

        The one entry point of the pipeline. Text mode with constant noise runs the backend's whole pipeline
        (its CUDA graph, where it has one). UsageError (one line) for an empty prompt or list, and bad options or
        images, before any model runs.
        """
        if mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_sampling(n, truncation_psi)
        self._check_noise_mode(noise_mode)
        if mode == "image":
            if images is None:
                raise UsageError('mode "image" needs images [rows, 3, H, W] in [-1, 1]')
            check_images(images)
            labels = [f"image {r}" for r in range(images.shape[0])] if prompt is None else as_prompts(prompt)
            if len(labels) != images.shape[0]:
                raise UsageError(f"mode image needs one label per image: {len(labels)} for {images.shape[0]} images")
            conditions = self._image_conditions(images)
        elif images is not None:
            raise UsageError(f'images go with mode "image", not mode {mode!r}')
        else:
            labels = as_prompts(prompt)
            if mode == "text" and noise_mode == "const":
                return self._generate_text(labels, n=n, seed=seed, truncation_psi=truncation_psi)
            conditions = self._text_conditions(labels) if mode == "text" else self._knn_conditions(labels, n, seed, **(knn or {}))
        return self._generate(conditions, labels, n=n, seed=seed, truncation_psi=truncation_psi, noise_mode=noise_mode)

    # ------------------------------------------------------------------------
    # Internal: conditions and rows. The server's batcher (engine/serve/triton_model.py) calls _generate_rows; everything
    # else goes through __call__.

    # Conditions: [rows, D] or, for knn, [rows * n, D].

    def _text_conditions(self, prompts: list[str]) -> torch.Tensor:
        return self._encode(self.clip.tokenize(list(prompts)))

    def _image_conditions(self, images: torch.Tensor) -> torch.Tensor:
        """images [rows, 3, H, W] in [-1, 1] -> their CLIP image embeddings ("more faces like this one")."""
        if self._image_clip is None:
            self._image_clip = self.clip.only("image").on(self.device)      # the image tower, or a copy of it on this device
        return torch.cat([self._image_clip.encode_image(x.to(self.device))[:count].float() for count, (x,) in blocks(self.batch_size, images)])

    def _knn_conditions(self, prompts: list[str], n: int, seed: int, k: int = 50, m: int = 10, alpha: float = 0.3) -> torch.Tensor:
        if not (math.isfinite(float(alpha)) and alpha > 0):
            raise UsageError(f"the KNN Dirichlet concentration must be a finite number > 0, got {alpha}")
        if self.bank is None:
            raise UsageError("mode knn needs an embedding bank")
        return knn_condition(self._text_conditions(prompts), self.bank.embeddings, n, seed, k=k, m=m, alpha=alpha)

    # The one row-based core: every caller says, per image row, its latent key, its truncation and its condition.

    @torch.no_grad()
    def _render_rows(self,
        keys: list[tuple[int, int, int]],       # Per row: the key (seed, i, j) of its latent and of its random noise.
        psi: list[float],                       # Per row: truncation psi.
        tokens: torch.Tensor | None = None,     # [B, context]: rows conditioned on text, tokenized ...
        conditions: torch.Tensor | None = None, # [B, D]: ... or on a CLIP embedding (image, KNN, or text already encoded).
        noise_mode: str = "const",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws [B, num_ws, w_dim] float32, images [B, H, W, C] uint8), on the CPU, row r from keys[r], psi[r] and its
        tokens or condition alone. Text with constant noise runs the backend's whole pipeline (its CUDA graph, where it
        has one); otherwise the condition goes through map and synthesize."""
        self._check_noise_mode(noise_mode)
        for p in psi:
            check_sampling(1, p)
        z, psi = seeded_latents(list(keys), self.mapper.z_dim), torch.tensor([float(p) for p in psi])
        if tokens is not None and noise_mode == "const":
            return self._render_text(tokens, z, psi)
        if conditions is None:
            conditions = self._encode(tokens)
        if conditions.shape[0] != len(keys):
            raise ValueError(f"{conditions.shape[0]} conditions for {len(keys)} rows")
        return self._render(conditions, z, psi, [noise_seed(*k) for k in keys], noise_mode)

    def _check_noise_mode(self, noise_mode: str) -> None:
        """UsageError (one line) for a noise mode that does not exist or that the backend does not run."""
        if noise_mode not in NOISE_MODES:
            raise UsageError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise_mode not in self.backend.noise_modes:
            raise UsageError(f"noise mode {noise_mode} needs --backend torch (exported graphs use constant noise)")

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        return torch.cat([self.backend.encode(t)[:count].float().clone() for count, (t,) in blocks(self.batch_size, tokens)])

    def _render(self, conditions: torch.Tensor, z: torch.Tensor, psi: torch.Tensor, noise: list[int], noise_mode: str):
        """conditions [B, D], z [B, z_dim], psi [B] and each image's noise seed -> (ws, uint8 images) on the CPU."""
        conditions, z, psi = conditions.to(self.device), z.to(self.device), psi.to(self.device)
        ws = torch.cat([self.backend.map(c, zc, pc)[:count].clone()        # [B, num_ws, w_dim]
                        for count, (c, zc, pc) in blocks(self.batch_size, conditions, z, psi)])
        images = []
        if noise_mode != "const":
            # One noise stream per image (its own seed), so an image does not depend on its batch: each block's
            # noise is drawn row by row from per-row generators and passed in, then the block runs at once.
            seeds = torch.tensor(noise, dtype=torch.int64)                 # < 2**63 (noise_seed); padded like the rows
            for count, (chunk, block_seeds) in blocks(self.batch_size, ws, seeds):
                images.append(to_host(self.backend.synthesize(chunk, noise_mode=noise_mode, noise_seeds=block_seeds.tolist())[:count]))
        else:
            for count, (chunk,) in blocks(self.batch_size, ws):
                images.append(to_host(self.backend.synthesize(chunk)[:count]))
        return ws.float().cpu(), torch.cat(images)

    def _render_text(self, tokens: torch.Tensor, z: torch.Tensor, psi: torch.Tensor):
        """tokens [B, context], z, psi -> (ws, uint8 images) on the CPU, through the backend's whole pipeline."""
        tokens, z, psi = tokens.to(self.device, torch.int32), z.to(self.device), psi.to(self.device)
        ws, images = [], []
        for count, (t, zc, pc) in blocks(self.batch_size, tokens, z, psi):
            w, image = self.backend.full(t, zc, pc)
            ws.append(w[:count].float().cpu().clone())                  # a backend's output buffer is reused by the next block
            images.append(to_host(image[:count]))
        return torch.cat(ws), torch.cat(images)

    # Callers of the core.

    @torch.no_grad()
    def _generate(self,
        conditions: torch.Tensor,               # [rows, D], or [rows * n, D] (one per image), row-major.
        labels: list[str],                      # One per row.
        n: int = 1,                             # Images per row.
        seed: int = 0,                          # Seed of the mapper latents (and of the noise in "random" mode).
        truncation_psi: float = 1.0,            # Pull ws toward the generator's w_avg; 1 = none.
        noise_mode: str = "const",              # "const", "random" or "none".
    ) -> Faces:
        rows = len(labels)
        check_sampling(n, truncation_psi)
        if conditions.shape[0] == rows:
            conditions = conditions.repeat_interleave(n, dim=0)             # [rows * n, D]
        if conditions.shape[0] != rows * n:
            raise ValueError(f"{conditions.shape[0]} conditions for {rows} rows of {n}")
        ws, images = self._render_rows(_keys(seed, rows, n), [truncation_psi] * (rows * n), conditions=conditions, noise_mode=noise_mode)
        return check_finite(Faces(images=images, ws=ws, labels=list(labels), n=n))

    @torch.no_grad()
    def _generate_text(self, prompts: list[str], n: int = 1, seed: int = 0, truncation_psi: float = 1.0) -> Faces:
        """Text mode with constant noise through the backend's whole pipeline (its CUDA graph, where it has one)."""
        check_sampling(n, truncation_psi)
        tokens = self.clip.tokenize(list(prompts)).repeat_interleave(n, dim=0)
        ws, images = self._render_rows(_keys(seed, len(prompts), n), [truncation_psi] * (len(prompts) * n), tokens=tokens)
        return check_finite(Faces(images=images, ws=ws, labels=list(prompts), n=n))

    @torch.no_grad()
    def _generate_rows(self,
        seeds: list[int],                       # One per row: the seed of that row's request.
        samples: list[int],                     # One per row: which image of its request (j of `--n`).
        truncations: list[float],               # One per row: truncation psi.
        prompts: list[str] | None = None,       # Mode "text": one prompt per row.
        images: torch.Tensor | None = None,     # Mode "image": [rows, 3, H, W] in [-1, 1].
        noise_mode: str = "const",
    ) -> Faces:
        """Independent requests in one batch (what a server's batcher merges): row r is the image that
        `self([prompts[r]], n=samples[r] + 1, seed=seeds[r], truncation_psi=truncations[r])` gives last
        (in mode "image" with images[r] as the condition), bit for bit: each row is computed the same whatever
        rows share its batch (see `blocks`).
        """
        if (prompts is None) == (images is None):
            raise ValueError("give either prompts (mode text) or images (mode image)")
        self._check_noise_mode(noise_mode)
        if prompts is not None:
            prompts = as_prompts(prompts)
        else:
            check_images(images)
        rows = len(prompts) if prompts is not None else images.shape[0]
        if not rows or not len(seeds) == len(samples) == len(truncations) == rows:
            raise ValueError(f"{rows} rows need one seed, sample and truncation each")
        keys = [(s, 0, j) for s, j in zip(seeds, samples)]
        if prompts is not None:
            ws, out = self._render_rows(keys, truncations, tokens=self.clip.tokenize(list(prompts)), noise_mode=noise_mode)
        else:
            ws, out = self._render_rows(keys, truncations, conditions=self._image_conditions(images), noise_mode=noise_mode)
        labels = list(prompts) if prompts is not None else [f"image {r}" for r in range(rows)]
        return check_finite(Faces(images=out, ws=ws, labels=labels, n=1))


def _keys(seed: int, rows: int, n: int) -> list[tuple[int, int, int]]:
    """Latent keys of `rows` rows of `n` images each, row-major: image j of row i is (seed, i, j)."""
    return [(seed, i, j) for i in range(rows) for j in range(n)]


FACE_SIZE = 256      # Side a face image is resized to before CLIP's own preprocessing (mode "image").


def face_tensor(image) -> torch.Tensor:
    """A face image (PIL image, or uint8 array [H, W, 3]) -> [3, FACE_SIZE, FACE_SIZE] float in [-1, 1], center-cropped square."""
    import PIL.Image

    im = image.convert("RGB") if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((FACE_SIZE, FACE_SIZE), PIL.Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


def check_finite(faces: Faces) -> Faces:
    """Refuse faces whose ws hold NaN or infinity (broken weights or options): their images would be flat colour."""
    if not torch.isfinite(faces.ws).all():
        raise UsageError("the pipeline produced non-finite ws (NaN or infinity): the mapper or generator weights are "
                         "broken; nothing was written")
    return faces


def to_host(images: torch.Tensor) -> torch.Tensor:
    """A CPU copy of uint8 images: through pinned memory with an async copy from a GPU."""
    if images.device.type != "cuda":
        return images.clone()
    host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
    host.copy_(images, non_blocking=True)
    torch.cuda.current_stream(images.device).synchronize()
    return host

