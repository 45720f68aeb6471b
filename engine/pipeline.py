"""Text -> faces on the PyTorch backend: CLIP text encoder -> mapper -> StyleGAN2 synthesis."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from t2f import presets
from t2f.clip import Clip, load_clip
from t2f.io import WeightsError
from t2f.mapper import Mapper, load_mapper_dir
from t2f.stylegan2 import NOISE_MODES, Generator, to_uint8, truncate

PRECISIONS = ("fp32", "fp16")


class MissingMapperError(Exception):
    """No mapper was given and none is published for the chosen generator and CLIP."""


# ----------------------------------------------------------------------------
# Pure functions.


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
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def sample_z(seed: int, num_prompts: int, n: int, z_dim: int) -> torch.Tensor:
    """Mapper latents [num_prompts * n, z_dim], prompt-major, one seeded stream per image.

    Image j of prompt i draws from numpy's generator seeded with (seed, i, j), on the CPU:
    the same seed gives the same latents on every device, and an image's latent does not
    depend on how many prompts or images were asked for.
    """
    z = [np.random.default_rng([int(seed), i, j]).standard_normal(z_dim, dtype=np.float32)
         for i in range(num_prompts) for j in range(n)]
    return torch.from_numpy(np.stack(z)) if z else torch.zeros([0, z_dim])


def check_compatible(generator: Generator, clip: Clip, mapper: Mapper) -> None:
    """Raise ValueError naming the first dimension on which the three models disagree."""
    cfg = mapper.config
    if cfg.embed_dim != clip.embed_dim:
        raise ValueError(f"the mapper expects {cfg.embed_dim}-d CLIP embeddings but CLIP {clip.name} gives {clip.embed_dim}-d")
    if (cfg.w_dim, cfg.num_ws) != (generator.w_dim, generator.num_ws):
        raise ValueError(f"the mapper makes {cfg.num_ws} x {cfg.w_dim} ws but the generator takes {generator.num_ws} x {generator.w_dim}")


# ----------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class Faces:
    images: torch.Tensor          # [num_prompts * n, H, W, C] uint8 on the CPU, prompt-major.
    ws: torch.Tensor              # [num_prompts * n, num_ws, w_dim] float32 on the CPU, after truncation.
    prompts: list[str]            # The prompts, in order.
    n: int                        # Images per prompt.


class TextToFace:
    """prompts -> faces. The same seed gives the same images on the same device and precision."""

    def __init__(self,
        generator: Generator,
        clip: Clip,
        mapper: Mapper,
        device: str | torch.device = "auto",   # "auto" = cuda when available, else cpu.
        precision: str = "fp32",                # "fp32", or "fp16" on CUDA: CLIP under autocast, the generator's fp16 blocks in half.
        batch_size: int = 8,                    # Images synthesized at once; bounds memory.
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use fp32 on the CPU")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_compatible(generator, clip, mapper)
        self.precision, self.batch_size = precision, batch_size
        self.generator = generator.eval().requires_grad_(False).to(self.device)
        self.mapper = mapper.eval().requires_grad_(False).to(self.device)
        self.clip = clip.to(self.device)

    @torch.no_grad()
    def __call__(self,
        prompts: list[str],                     # Non-empty prompts.
        n: int = 1,                             # Images per prompt.
        seed: int = 0,                          # Seed of the mapper latents (and of the noise in "random" mode).
        truncation_psi: float = 1.0,            # Pull ws toward the generator's w_avg; 1 = none.
        noise_mode: str = "const",              # "const", "random" or "none".
    ) -> Faces:
        prompts = list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("every prompt must be a non-empty string")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if not torch.isfinite(torch.tensor(float(truncation_psi))):
            raise ValueError(f"truncation psi must be finite, got {truncation_psi}")
        half = self.precision == "fp16"

        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            embedding = self.clip.encode_text(prompts).float()              # [P, D]
        embedding = embedding.repeat_interleave(n, dim=0)                   # [P*n, D]
        z = sample_z(seed, len(prompts), n, self.mapper.z_dim).to(self.device)
        ws = self.mapper(embedding, z)                                      # [P*n, num_ws, w_dim]
        ws = truncate(ws, self.generator.w_avg, truncation_psi)

        images = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            for chunk in ws.split(self.batch_size):
                img = self.generator.synthesis(chunk.half() if half else chunk, noise_mode=noise_mode)
                images.append(to_uint8(img).cpu())
        return Faces(images=torch.cat(images), ws=ws.float().cpu(), prompts=prompts, n=n)


# ----------------------------------------------------------------------------
# Building a pipeline from names and paths.


def load_mapper(source: str | None, generator: Generator, generator_name: str, clip: Clip) -> Mapper:
    """A mapper from "tiny" (random weights) or a mapper directory."""
    if source is None:
        raise MissingMapperError(
            f"no trained mapper is published for {generator_name} with CLIP {clip.name} yet; "
            f"pass --mapper DIR with a mapper directory made by t2f-train (--mapper tiny gives random weights)")
    if source == presets.TINY and not os.path.exists(source):
        return presets.random_mapper(generator, clip.embed_dim)
    mapper, meta = load_mapper_dir(source)
    trained_clip = meta.get("clip")
    if trained_clip is not None and trained_clip != clip.name:
        raise WeightsError(f"{source} was trained for CLIP {trained_clip}, not {clip.name}; pass --clip {trained_clip}")
    return mapper


def load_pipeline(
    generator: str = "ffhq-1024",     # Preset name, converted directory, NVIDIA pickle or rosinality .pt.
    clip: str = "ViT-B-32:openai",    # open_clip MODEL:TAG, MODEL:/path/to/checkpoint, or "tiny".
    mapper: str | None = None,        # Mapper directory or "tiny"; None = fail with how to get one.
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 8,
    cache: str | None = None,         # Download cache; None = $T2F_CACHE or ~/.cache/t2f.
    progress: bool = True,
) -> TextToFace:
    from t2f import load_generator

    g = load_generator(generator, cache=cache, progress=progress)
    c = load_clip(clip, cache_dir=None if cache is None else os.path.join(cache, "clip"))
    m = load_mapper(mapper, g, generator, c)
    return TextToFace(g, c, m, device=device, precision=precision, batch_size=batch_size)
