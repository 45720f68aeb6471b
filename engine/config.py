"""A pipeline from names and paths: one validated, frozen `PipelineConfig`, its click options, and `load_pipeline`.

`load_pipeline`, `t2f-infer`, `t2f-serve` and `t2f-bench` all build a PipelineConfig (the commands
through the one option group `pipeline_options`); `t2f-export` takes its models part,
t2f.sources.ModelSources (t2f.cli.model_options). The defaults are the commands' and the
library's alike: the generator and CLIP the mapper was trained for, backend and precision "auto".
"""

from __future__ import annotations

import dataclasses
import functools
import os

import click
import torch

from t2f.config import FieldError
from t2f.precision import Precision
from t2f.sources import ModelSources

from .backends import backend_names
from .pipeline import TextToFace

MAX_BATCH = 256      # --batch's bound (rows per graph call); the library takes any positive count.


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What a pipeline is made of and how it runs; validated when made (FieldError, a ValueError, naming the field)."""
    mapper: str | None = None             # Run directory, hf-hub:ORG/NAME[@REVISION], or "tiny"; None = fail saying how to get one.
    generator: str | None = None          # None = the one the mapper was trained for (its config.json).
    clip: str | None = None               # None = the one the mapper was trained for.
    backend: str = "auto"                 # "auto" (the fastest accurate one here) or a registered backend's name.
    precision: Precision | None = None    # None ("auto" is taken too) = the backend's fastest accurate precision here.
    device: str = "auto"                  # "auto" (CUDA where the backend runs there, else cpu), "cpu", "cuda", "cuda:N".
    batch_size: int | None = None         # Rows per graph call; None = 1 on the CPU, 8 on a GPU.
    artifacts: str | None = None          # t2f-export output for the exported-graph backends; None = export into the cache.
    cache: str | None = None              # Download cache of generators and CLIPs; None = $T2F_CACHE or ~/.cache/t2f.

    def __post_init__(self):
        from t2f.devices import resolve_device

        models = ModelSources(mapper=self.mapper, generator=self.generator, clip=self.clip, cache=self.cache)
        for name in ("mapper", "generator", "clip", "cache"):
            object.__setattr__(self, name, getattr(models, name))         # paths as strings
        if self.backend != "auto" and self.backend not in backend_names():
            raise FieldError("backend", f"unknown backend {self.backend!r}; one of auto, {', '.join(backend_names())}")
        precision = None if self.precision in (None, "auto") else self.precision
        try:
            precision = None if precision is None else Precision.parse(precision)
        except ValueError as e:
            raise FieldError("precision", f"{e} or auto") from None
        object.__setattr__(self, "precision", precision)
        if not isinstance(self.device, (str, torch.device)):
            raise FieldError("device", f"device must be a string such as auto, cpu or cuda:0, got {self.device!r}")
        object.__setattr__(self, "device", str(self.device))
        try:
            resolved = resolve_device(self.device)
        except ValueError as e:
            raise FieldError("device", str(e)) from None
        if precision is not None:
            try:
                precision.check_device(resolved)
            except ValueError as e:
                raise FieldError("precision", str(e)) from None
        if self.batch_size is not None and (type(self.batch_size) is not int or self.batch_size < 1):
            raise FieldError("batch_size", f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if isinstance(self.artifacts, os.PathLike):
            object.__setattr__(self, "artifacts", os.fspath(self.artifacts))
        if self.artifacts is not None and (not isinstance(self.artifacts, str) or not self.artifacts.strip()):
            raise FieldError("artifacts", f"artifacts must be a non-empty path or None, got {self.artifacts!r}")

    @property
    def models(self) -> ModelSources:
        return ModelSources(mapper=self.mapper, generator=self.generator, clip=self.clip, cache=self.cache)


def load_pipeline(
    mapper: str | os.PathLike | None = None,   # Run directory, hf-hub:ORG/NAME[@REVISION], or "tiny" (random weights).
    *,
    generator: str | None = None,         # None = the one the mapper was trained for.
    clip: str | None = None,              # None = the one the mapper was trained for.
    backend: str = "auto",                # "auto" = the fastest accurate backend here (docs/backends.md).
    precision: Precision | str | None = "auto",   # "auto" (or None) = that backend's fastest accurate precision here.
    device: str | torch.device = "auto",
    batch_size: int | None = None,        # Rows per graph call; None = 1 on the CPU, 8 on a GPU.
    artifacts: str | None = None,         # t2f-export output directory for the exported-graph backends.
    cache: str | None = None,             # Download cache; None = $T2F_CACHE or ~/.cache/t2f (Hub mappers: $HF_HOME).
    bank: str | None = None,              # Embedding bank for mode "knn"; None = none, "" = the mapper's own.
    noise_mode: str = "const",            # The noise mode the runs will use (backend "auto" picks one that supports it).
    progress: bool = True,                # Download progress bars.
) -> TextToFace:
    """A ready pipeline: `load_pipeline("runs/ffhq")`, `load_pipeline("hf-hub:ORG/NAME")`, `load_pipeline("tiny")`.

    The generator and CLIP are the ones the mapper records unless given (then they are checked against its
    fingerprints). Raises ValueError (a FieldError) for a bad argument, and the loaders' one-line errors.
    """
    config = PipelineConfig(mapper=mapper, generator=generator, clip=clip, backend=backend, precision=precision, device=device,
                            batch_size=batch_size, artifacts=artifacts, cache=cache)
    return build_pipeline(config, bank=bank, noise_mode=noise_mode, progress=progress)


def build_pipeline(config: PipelineConfig, bank: str | None = None, noise_mode: str = "const", progress: bool = True) -> TextToFace:
    """The pipeline of a PipelineConfig (see `load_pipeline` for bank, noise_mode and progress)."""
    from t2f.bank import BANK_NAME, load_bank
    from t2f.sources import load_models

    generator, clip, mapper, resolved = load_models(config.models, bank=bank == "", progress=progress)
    loaded_bank = None if bank is None else load_bank(bank or os.path.join(resolved.mapper, BANK_NAME))
    pipe = TextToFace(generator, clip, mapper, device=config.device, precision=config.precision, batch_size=config.batch_size,
                      bank=loaded_bank, backend=config.backend, artifacts=config.artifacts, noise_mode=noise_mode)
    pipe.sources = resolved
    return pipe


# ----------------------------------------------------------------------------
# The option group every command that builds a pipeline shares.

OPTION_OF = dict(mapper="--mapper", generator="--generator", clip="--clip", cache="--cache", backend="--backend",
                 precision="--precision", device="--device", batch_size="--batch", artifacts="--artifacts")


def pipeline_options(runtime: bool = True, multiple_devices: bool = False, mapper_default: str | None = None):
    """click decorator: the model options (t2f.cli.model_options), --device and --artifacts, and with `runtime`
    --backend, --precision and --batch, passed to the command as one PipelineConfig argument `config`.

    multiple_devices (t2f-serve): --device may be repeated; the command also gets them all as `devices`
    (config.device is the first). A value the config refuses is a usage error on its option (exit code 2).
    """
    from t2f.cli import DeviceParam, PrecisionChoice, model_options

    options = [
        click.option("--backend",   help="How to run the graphs (auto = the fastest accurate one here)", type=click.Choice(("auto",) + backend_names()),
                     default="auto", show_default=True),
        click.option("--precision", help="Compute precision: auto = the backend's fastest accurate one here (fp16 needs CUDA, bf16 a CPU "
                                         "with bf16 instructions)", type=PrecisionChoice(), default="auto", show_default=True),
        click.option("--batch",     help="Rows per graph call (bounds memory; the same --batch in t2f-infer and t2f-serve gives the same "
                                         "images bit for bit) [default: 1 on the CPU, 8 on a GPU]", metavar="INT", type=click.IntRange(1, MAX_BATCH)),
    ] if runtime else []
    options += [
        click.option("--device",    help="auto (cuda where there is one), cpu, cuda or cuda:N"
                                         + ("; repeat for one model instance per device" if multiple_devices else ""),
                     metavar="STR", multiple=multiple_devices, default=["auto"] if multiple_devices else "auto", show_default=True,
                     type=None if multiple_devices else DeviceParam()),
        click.option("--artifacts", help="t2f-export output for the exported-graph backends [default: exported into the cache]",
                     metavar="DIR", type=click.Path(file_okay=False)),
    ]

    def decorate(f):
        @functools.wraps(f)
        def command(models: ModelSources, device, artifacts, backend="auto", precision=None, batch=None, **kw):
            devices = tuple(device) if multiple_devices else (device,)
            try:
                config = PipelineConfig(mapper=models.mapper, generator=models.generator, clip=models.clip, cache=models.cache,
                                        backend=backend, precision=precision, device=devices[0], batch_size=batch, artifacts=artifacts)
            except FieldError as e:
                raise click.BadParameter(str(e), param_hint=OPTION_OF.get(e.field, e.field)) from None
            return f(config=config, **(dict(devices=devices) if multiple_devices else {}), **kw)

        for option in reversed(options):
            command = option(command)
        return model_options(mapper_default)(command)

    return decorate
