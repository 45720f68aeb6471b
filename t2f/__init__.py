"""t2f: fast text-to-face. CLIP text encoder -> mapper -> StyleGAN2.

The core package holds the shared models, their weight loading and the export's artifacts;
`t2f.trainer`, `t2f.export`, `t2f.engine` and `t2f.cli` build on it and it imports none of them
(tests/test_structure.py holds it to that).
"""

from __future__ import annotations

import os

from .clip import DEFAULT_CLIP, Clip, ClipLoadError, load_clip
from .download import DownloadError
from .io import WeightsError
from .mapper import Mapper, MapperConfig, load_mapper_dir, save_mapper
from .stylegan2 import Generator, GeneratorConfig, truncate
from .weights import import_generator, save_generator

__version__ = "0.1.0"


def load_generator(source: str | os.PathLike, cache: str | os.PathLike | None = None, progress: bool = True) -> Generator:
    """A StyleGAN2 generator from a preset name ("tiny", "ffhq-1024"), a converted directory,
    an NVIDIA stylegan2-ada-pytorch / stylegan3-release pickle, or a rosinality `.pt` checkpoint.

    Nothing in a weights file is ever executed. Raises WeightsError or DownloadError.
    """
    from . import presets

    if isinstance(source, str) and presets.is_generator_preset(source) and not os.path.exists(source):
        return presets.generator_from_preset(source, cache, progress=progress)
    return import_generator(source)


__all__ = [
    "Clip", "ClipLoadError", "DEFAULT_CLIP", "DownloadError", "Generator", "GeneratorConfig", "Mapper",
    "MapperConfig", "WeightsError", "load_clip", "load_generator", "load_mapper_dir", "save_generator",
    "save_mapper", "truncate", "import_generator",
]
