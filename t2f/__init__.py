"""t2f: fast text-to-face. CLIP text encoder -> mapper -> StyleGAN2.

The core package holds the shared models, their weight loading and the export's artifacts;
`t2f.trainer`, `t2f.export`, `t2f.engine` and `t2f.cli` build on it and it imports none of them
(tests/test_structure.py holds it to that).

Its names load on first use (`t2f.load_clip` imports t2f.clip, and with it torch, when it is first
read), so the standard-library-only modules, t2f.files and t2f.private, import without torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

__version__ = "0.1.0"

_EXPORTS = {   # name -> the module of this package that defines it
    "Clip": "clip", "ClipLoadError": "clip", "DEFAULT_CLIP": "clip", "load_clip": "clip",
    "DownloadError": "download",
    "WeightsError": "io",
    "Mapper": "mapper", "MapperConfig": "mapper", "load_mapper_dir": "mapper", "save_mapper": "mapper",
    "Generator": "stylegan2", "GeneratorConfig": "stylegan2", "truncate": "stylegan2",
    "import_generator": "weights", "save_generator": "weights",
}


def __getattr__(name: str):
    """A name of __all__, imported from its module on first use; else a submodule (`t2f.clip` after `import t2f`)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def load_generator(source: str | os.PathLike, cache: str | os.PathLike | None = None, progress: bool = True):
    """A StyleGAN2 generator (t2f.Generator) from a preset name ("tiny", "ffhq-1024"), a converted directory,
    an NVIDIA stylegan2-ada-pytorch / stylegan3-release pickle, or a rosinality `.pt` checkpoint.

    Nothing in a weights file is ever executed. Raises WeightsError or DownloadError.
    """
    from . import presets
    from .weights import import_generator

    if isinstance(source, str) and presets.is_generator_preset(source) and not os.path.exists(source):
        return presets.generator_from_preset(source, cache, progress=progress)
    return import_generator(source)


__all__ = sorted([*_EXPORTS, "load_generator"])
