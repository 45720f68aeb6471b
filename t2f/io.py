"""Model directories (`config.json` beside `model.safetensors`), checked weight loading and weight fingerprints: what
needs torch. Reading and writing files (atomic writes, bounded JSON, input and output checks) is t2f.files's."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import T2FError
from .files import InputPathError, atomic_dir, atomic_path, is_regular_file, read_json_as, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class WeightsError(T2FError):
    """Weights that cannot be loaded: missing, truncated, corrupt, unsafe or mismatched."""


# ----------------------------------------------------------------------------
# Model directories.


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors.torch.save, with the header's metadata in sorted key order: the same tensors and metadata give the
    same bytes in every process (safetensors writes the metadata in its hash map's order, which changes per process)."""
    data = save(tensors, metadata=metadata)
    if not metadata:
        return data
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:                                       # not safetensors' own compact JSON: leave it as written
        return data
    return data[:8] + text.ljust(size) + data[8 + size:]       # padded with spaces to the same length, as safetensors pads


def write_model_files(directory: str | os.PathLike, kind: str, config: dict, state_dict: dict, **extra) -> Path:
    """Write `model.safetensors`, then `config.json` ({"kind", "config", **extra}), each atomically, into `directory`."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        tmp.write_bytes(safetensors_bytes(tensors))   # serialized in memory: a failed write is an OSError, not a library error
    write_json(directory / CONFIG_NAME, dict(kind=kind, config=config, **extra))
    return directory


def save_model_dir(directory: str | os.PathLike, kind: str, config: dict, state_dict: dict, overwrite: bool = False, **extra) -> Path:
    """A new model directory, written whole to a temporary sibling and renamed into place."""
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        write_model_files(tmp, kind, config, state_dict, **extra)
    return Path(directory)


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of a module's tensors by name: identifies the exact weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def read_model_dir(directory: str | os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a model directory of the given kind: (the whole config.json, tensors)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.exists():
            raise WeightsError(f"{directory} is not a t2f {kind} directory: {p.name} is missing")
        if not is_regular_file(p):
            raise WeightsError(str(InputPathError(p, "is not a regular file; t2f reads regular files only")))
    meta = read_config(directory, kind, f"{directory} is not a t2f {kind} directory: {CONFIG_NAME} is missing")
    try:
        tensors = load_file(str(weights_path))
    except PermissionError as e:
        raise WeightsError(f"{weights_path}: cannot read ({e.strerror})") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{weights_path} is truncated or corrupt: {e}") from None
    return meta, tensors


def read_config(directory: str | os.PathLike, kind: str, missing: str) -> dict:
    """The whole config.json of the t2f `kind` directory `directory` (a bounded read); WeightsError (one line) where it
    is unreadable, malformed or of another kind, and WeightsError(`missing`) where it is not there."""
    path = os.path.join(directory, CONFIG_NAME)
    meta = read_json_as(path, WeightsError, missing)
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise WeightsError(f"{path} describes a {found!r}, not a {kind!r}")
    return meta


def load_model_dir(directory: str | os.PathLike, kind: str, config_cls, build) -> tuple[torch.nn.Module, dict]:
    """(module, the whole config.json): `build(config_cls.from_dict(config))` with the directory's tensors loaded."""
    meta, tensors = read_model_dir(directory, kind)
    try:
        config = config_cls.from_dict(meta.get("config"))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{directory}: invalid config.json: {e}") from None
    return build_checked(build, config, tensors, str(directory)), meta


def build_checked(build, config, tensors: dict, source: str) -> torch.nn.Module:
    """`build(config)` loaded with `tensors`, failing by name on any missing, unexpected, misshapen or mistyped entry.

    The names and shapes are checked on a model built on the meta device first, so a
    config that does not match its weights fails before any memory is allocated for it.
    """
    with torch.device("meta"):
        reference = build(config).state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    bad_type = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if k not in bad_type and tuple(tensors[k].shape) != expected[k])
    problems = []
    if bad_type:
        problems.append(f"not tensors {_names(bad_type)}")
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong:
        problems.append("wrong shape " + ", ".join(f"{k} {tuple(tensors[k].shape)} != {expected[k]}" for k in wrong[:3]))
    if not problems:
        # A float must stay a float (any precision is cast); an integer buffer must stay an integer of the same kind.
        dtypes = {k: v.dtype for k, v in reference.items()}
        wrong_dtype = sorted(k for k, v in tensors.items() if v.is_floating_point() != dtypes[k].is_floating_point
                             or v.dtype.is_complex or (not v.is_floating_point() and v.dtype != dtypes[k]))
        if wrong_dtype:
            problems.append("wrong dtype " + ", ".join(f"{k} {tensors[k].dtype} != {dtypes[k]}" for k in wrong_dtype[:3]))
    if problems:
        raise WeightsError(f"{source}: weights do not match the config: " + "; ".join(problems))
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise WeightsError(f"{source}: non-finite values in {_names(bad)}")
    module = build(config)
    state = module.state_dict()
    module.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=True)
    return module


def _names(names: list[str], limit: int = 4) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
