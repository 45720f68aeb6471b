"""Named presets: architectures in code, and, kept apart, where pretrained weights come from.

`tiny` (TINY) is the one name of the random-weight models every command accepts for its
generator, CLIP and mapper; their weights come from TINY_SEED.
"""

from __future__ import annotations

import os

import torch

from .download import WeightSource, fetch
from .mapper import Mapper, MapperConfig, MissingMapperError, check_trained_for, load_mapper_dir
from .stylegan2 import Generator, GeneratorConfig

TINY = "tiny"
TINY_SEED = 0

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


def load_mapper(source: str | None, generator: Generator, generator_name: str, clip) -> Mapper:
    """A mapper from "tiny" (random weights) or a mapper directory, refused if trained for other weights."""
    if source is None:
        raise MissingMapperError(
            f"no trained mapper is published for {generator_name} with CLIP {clip.name} yet; "
            f"make one with `t2f-train --generator {generator_name} --clip {clip.name} --out RUN` and pass --mapper RUN "
            f"(--mapper {TINY} gives random weights)")
    if is_random_preset(source):
        return random_mapper(generator, clip.embed_dim)
    mapper, meta = load_mapper_dir(source)
    check_trained_for(meta, source, generator, generator_name, clip)
    return mapper
