"""Where a pipeline's three models come from: a mapper, and the generator and CLIP it records.

The mapper is a run directory (what `t2f-train --out` writes), `hf-hub:ORG/NAME[@REVISION]` (the
same files on the Hugging Face Hub, t2f.hub) or `tiny` (random weights). Its config.json records
the generator and CLIP it was trained for (t2f.mapper.TrainedFor); those are what load unless a
generator or CLIP is given, and whichever loads is checked against the recorded fingerprints.
`tiny`'s record is the tiny generator and CLIP (t2f.presets.TINY_RECORD).

`resolve` reads the record only (a Hub mapper's files are fetched first); `load_models` then loads
the mapper (its weights checked before anything is allocated), the generator and the CLIP.
"""

from __future__ import annotations

import dataclasses
import os

from . import hub
from .bank import BANK_NAME
from .config import FieldError
from .files import read_json
from .io import WeightsError, read_config
from .mapper import MAPPER_KIND, MissingMapperError, TrainedFor, check_trained_for, load_mapper_dir, trained_for
from .presets import DEFAULT_CLIP, DEFAULT_GENERATOR, TINY, TINY_RECORD, is_generator_preset, is_random_preset, random_mapper

MAPPER_FILES = ("config.json", "model.safetensors")   # what t2f reads of a mapper directory (and BANK_NAME for KNN mode)
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")   # a recorded CLIP "MODEL:FILE" names a checkpoint


@dataclasses.dataclass(frozen=True)
class ModelSources:
    """The three models of a pipeline, by name; validated when made (FieldError, a ValueError, naming the field)."""
    mapper: str | None = None       # Run directory, hf-hub:ORG/NAME[@REVISION], or "tiny"; None = fail saying how to get one.
    generator: str | None = None    # Preset, directory, NVIDIA .pkl or rosinality .pt; None = the one the mapper was trained for.
    clip: str | None = None         # open_clip MODEL:TAG, MODEL:/path/to/checkpoint, or "tiny"; None = the mapper's.
    cache: str | None = None        # Download cache of generators and CLIPs; None = $T2F_CACHE or ~/.cache/t2f.
                                    # (A Hub mapper goes to the Hugging Face cache: $HF_HOME.)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, field.name, value)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise FieldError(field.name, f"{field.name} must be a non-empty string (or None), got {value!r}")
        if hub.is_hub_id(self.mapper):
            try:
                hub.parse(self.mapper)           # now, not after the downloads
            except hub.HubIdError as e:
                raise FieldError("mapper", str(e)) from None


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What `resolve` found: a local mapper and the generator and CLIP that go with it."""
    mapper: str                     # "tiny", or a local mapper directory (a Hub mapper's snapshot in the Hugging Face cache).
    label: str                      # The mapper as it was given: how messages name it.
    generator: str                  # What loads: given, or as recorded.
    clip: str
    record: TrainedFor              # What the mapper records (fingerprints are checked against it).


def resolve(sources: ModelSources, bank: bool = False, progress: bool = True) -> Resolved:
    """The mapper's local directory and record, and the generator and CLIP to load; nothing but config.json is read.

    bank: also fetch a Hub mapper's bank.safetensors (KNN mode). Raises MissingMapperError, HubError, WeightsError, and
    FieldError (on "mapper") for a mapper path that is not a directory.
    """
    label = sources.mapper
    if label is None:
        generator, clip = sources.generator or DEFAULT_GENERATOR, sources.clip or DEFAULT_CLIP
        raise MissingMapperError(
            f"no trained mapper is published for {generator} with CLIP {clip} yet; make one with "
            f"`t2f-train --generator {generator} --clip {clip} --out RUN` and pass --mapper RUN "
            f"(--mapper {TINY} gives random weights)")
    if is_random_preset(label):
        directory, record = TINY, TINY_RECORD
    else:
        directory = label
        if hub.is_hub_id(label):
            directory = str(hub.download(hub.parse(label), MAPPER_FILES + ((BANK_NAME,) if bank else ()), progress=progress))
        record = _record(directory, label)
    generator = sources.generator or _recorded_generator(record, label)
    clip = sources.clip or _recorded_clip(record, directory, label)
    return Resolved(mapper=directory, label=label, generator=generator, clip=clip, record=record)


def load_models(sources: ModelSources, bank: bool = False, progress: bool = True):
    """(generator, clip, mapper, Resolved): the mapper first (a directory's weights checked before allocation), then the
    generator and CLIP it records (or those given), refused where they are not the weights it was trained for."""
    import t2f

    from .clip import load_clip

    resolved = resolve(sources, bank=bank, progress=progress)
    mapper = None
    if resolved.mapper != TINY:
        mapper, _ = load_mapper_dir(resolved.mapper)
    generator = t2f.load_generator(resolved.generator, cache=sources.cache, progress=progress)
    clip = load_clip(resolved.clip, cache_dir=None if sources.cache is None else os.path.join(sources.cache, "clip"))
    check_trained_for(resolved.record, resolved.label, generator, resolved.generator, clip)
    if mapper is None:
        mapper = random_mapper(generator, clip.embed_dim)
    return generator, clip, mapper, resolved


# ----------------------------------------------------------------------------
# The record.


def _record(directory: str, label: str) -> TrainedFor:
    """The record in a mapper directory's config.json (bounded read; the weights are checked when they load).

    A mapper that is not a directory here is the one check of a mapper path, for every tool: a FieldError on "mapper"
    (a command's usage error on --mapper). It is made here, when the mapper is used, not when it is named: t2f-serve
    --write-repository names a mapper for the machine Triton runs on."""
    if not os.path.isdir(directory):
        raise FieldError("mapper", f"{label} is not a mapper directory here (a mapper is a t2f-train run directory, "
                                   f"{hub.PREFIX}ORG/NAME or {TINY})")
    meta = read_config(directory, MAPPER_KIND, f"{label} is not a t2f mapper directory: config.json is missing")
    return trained_for(meta, label)


def _recorded_generator(record: TrainedFor, label: str) -> str:
    """The recorded generator where it can load here: a preset name, or a path that exists."""
    name = record.generator
    if name is None:
        raise WeightsError(f"{label} records no generator; pass --generator")
    if not is_generator_preset(name) and not os.path.exists(name):
        raise WeightsError(f"{label} was trained for generator {name}, which is not on this machine; "
                           f"pass --generator with those weights (their fingerprint is checked)")
    return name


def _recorded_clip(record: TrainedFor, directory: str, label: str) -> str:
    """The recorded CLIP where it can load here; a local run's options.json gives a checkpoint's full path."""
    name = record.clip
    if name is None:
        raise WeightsError(f"{label} records no CLIP; pass --clip")
    model, _, pretrained = name.partition(":")
    if not pretrained.lower().endswith(CHECKPOINT_SUFFIXES):
        return name                              # a pretrained tag, MODEL:random or tiny: its loader fetches it
    spec = _run_clip_spec(directory, record)
    if spec is not None and os.path.isfile(spec.partition(":")[2]):
        return spec
    raise WeightsError(f"{label} was trained for CLIP {model} with the checkpoint {pretrained}, which is not on this machine; "
                       f"pass --clip {model}:/path/to/{pretrained} (its fingerprint is checked)")


def _run_clip_spec(directory: str, record: TrainedFor) -> str | None:
    """The CLIP spec (with the checkpoint's absolute path) a t2f-train run's options.json records for the same weights."""
    try:
        synth = read_json(os.path.join(directory, "options.json")).get("synth") or {}
        same = synth["identity"]["clip_fingerprint"] == record.clip_fingerprint
        return synth["clip_spec"] if same and isinstance(synth["clip_spec"], str) else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
