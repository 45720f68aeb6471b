"""Named presets: architectures in code, and, kept apart, where pretrained weights come from and their licences.

`tiny` (TINY) is the one name of the random-weight models every command accepts for its
generator, CLIP and mapper; their weights come from TINY_SEED. The default model names
(DEFAULT_GENERATOR, DEFAULT_CLIP) are defined here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .download import WeightSource, fetch
from .mapper import Mapper, MapperConfig, TrainedFor
from .stylegan2 import Generator, GeneratorConfig

TINY = "tiny"
TINY_SEED = 0

# What t2f-train trains for when no --generator / --clip is given, and what the message of a missing mapper names.
# Inference takes the generator and CLIP a mapper records (t2f.sources), never these.
DEFAULT_GENERATOR = "ffhq-1024"
DEFAULT_CLIP = "ViT-B-32:openai"

# `--mapper tiny`'s record: random weights sized for whatever generator and CLIP it is given, the tiny ones by default.
TINY_RECORD = TrainedFor(generator=TINY, clip=TINY)

# ----------------------------------------------------------------------------
# Architectures of the random-weight presets (for tests, smoke runs and timing).

GENERATOR_ARCHS = {
    TINY: GeneratorConfig(resolution=64, z_dim=32, w_dim=32, mapping_layers=2, channel_base=1024, channel_max=32,
                          num_fp16_res=2, conv_clamp=256.0),
    # NVIDIA's FFHQ architectures with random weights: for timing, never for faces.
    "random-256": GeneratorConfig(resolution=256, channel_base=16384, num_fp16_res=4, conv_clamp=256.0),
    "random-1024": GeneratorConfig(resolution=1024, channel_base=32768, num_fp16_res=4, conv_clamp=256.0),
}

MAPPER_ARCHS = {
    TINY: dict(z_dim=16, hidden=64, layers=4, mean_head=True),
}

# ----------------------------------------------------------------------------
# Published weights. Licences are the publishers'; read them before use.

GENERATOR_SOURCES = {
    # NVIDIA stylegan2-ada-pytorch, FFHQ 1024x1024 (num_fp16_res 4, conv_clamp 256).
    # The sha256 digests come from a third-party listing and could not be checked here
    # (no network on our machines); a mismatch refuses the file and says how to bypass.
    "ffhq-1024": WeightSource(
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl",
        filename="stylegan2-ada-ffhq-1024.pkl",
        sha256=("a205a346e86a9ddaae702e118097d014b7b8bd719491396a162cca438f2f524c",
                "22151b43e01d6b96d2f772671c5f3cf73b63fed6d2b2661d72f6cf6ca9b39194"),
        licence="NVIDIA Source Code License-NC: non-commercial research and evaluation only",
        flag="--generator",
    ),
}


# Where weights come from and their licences, for what t2f writes about a model (the model card of a run).
RANDOM_LICENCE = "MIT (t2f's own random weights from a fixed seed: not a trained model)"
CLIP_LICENCES = {"openai": "MIT (OpenAI CLIP)"}      # by open_clip pretrained tag; any other: its Hub model card


@dataclasses.dataclass(frozen=True)
class Origin:
    source: str                   # Where the weights come from, in one line.
    licence: str                  # Their licence, in one line.


def generator_origin(name: str) -> Origin:
    """Where the generator `name` (a preset, or a path) comes from, and its licence."""
    if name in GENERATOR_ARCHS:
        return Origin(f"t2f preset {name}: random weights, seed {TINY_SEED}", RANDOM_LICENCE)
    if name in GENERATOR_SOURCES:
        return Origin(GENERATOR_SOURCES[name].url, GENERATOR_SOURCES[name].licence)
    return Origin(f"local weights {os.path.basename(str(name).rstrip('/')) or name}", "the weights' own (not known to t2f)")


def clip_origin(spec: str) -> Origin:
    """Where the CLIP `spec` (tiny, MODEL:random, MODEL:TAG or MODEL:/path) comes from, and its licence."""
    import open_clip

    model, _, tag = spec.partition(":")
    if spec == TINY or tag == "random":
        return Origin(f"t2f preset {spec}: random weights, seed {TINY_SEED}", RANDOM_LICENCE)
    hub = (open_clip.get_pretrained_cfg(model, tag) or {}).get("hf_hub", "").rstrip("/")
    if not hub:
        return Origin(f"open_clip {model} with local checkpoint {os.path.basename(tag)}", "the checkpoint's own (not known to t2f)")
    return Origin(f"open_clip {model} pretrained tag {tag}: https://huggingface.co/{hub}",
                  CLIP_LICENCES.get(tag, f"see https://huggingface.co/{hub}"))


def random_generator(name: str = TINY, seed: int = TINY_SEED) -> Generator:
    """A generator of a named architecture with random weights from a fixed seed; w_avg is the mean of 4096 mapped z."""
    config = GENERATOR_ARCHS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(config).eval().requires_grad_(False)
        with torch.no_grad():
            z = torch.randn([4096, config.z_dim])
            generator.mapping.w_avg.copy_(generator.mapping(z)[:, 0].mean(dim=0))
    return generator


def random_mapper(generator: Generator, embed_dim: int, name: str = TINY, seed: int = TINY_SEED) -> Mapper:
    """A mapper with random weights from a fixed seed, sized for `generator` and a CLIP of `embed_dim`."""
    config = MapperConfig(embed_dim=embed_dim, w_dim=generator.w_dim, num_ws=generator.num_ws, **MAPPER_ARCHS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Mapper(config, w_avg=generator.w_avg).eval().requires_grad_(False)


def generator_from_preset(name: str, cache: str | None = None, progress: bool = True) -> Generator:
    from .weights import import_generator

    if name in GENERATOR_ARCHS:
        return random_generator(name)
    return import_generator(fetch(GENERATOR_SOURCES[name], cache, progress=progress))


def is_generator_preset(name: str) -> bool:
    return name in GENERATOR_ARCHS or name in GENERATOR_SOURCES


def is_random_preset(name: str | None) -> bool:
    """True for the `tiny` name (unless a file or directory of that name is there): random weights, not a trained model."""
    return name == TINY and not os.path.exists(name)

