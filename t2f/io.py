"""Atomic file writes and model directories (`config.json` beside `model.safetensors`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .private import LOCK_NAME, DirectoryInUse, directory_lock  # noqa: F401  (its callers import the lock from here)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class WeightsError(Exception):
    """Weights that cannot be loaded: missing, truncated, corrupt, unsafe or mismatched."""


# ----------------------------------------------------------------------------
# Outputs: what a path may be, and atomic writes (a temporary sibling, then os.replace).


class OutputPathError(OSError):
    """An output path that t2f refuses to write: it exists and is not what t2f replaces."""

    def __init__(self, path, reason: str):
        super().__init__(errno.EEXIST, reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse a file output that exists and is not a regular file: t2f replaces regular files only.

    A symlink is refused too, whatever it points to: the atomic rename would replace the
    link itself, not its target, and following it would let a link planted in a shared
    directory redirect the write. Symlinked parent directories are followed as usual.
    """
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return                                             # nothing there to replace; writing reports a bad parent
    if stat.S_ISLNK(mode):
        raise OutputPathError(path, f"is a symlink (to {os.readlink(path)}); t2f does not write through symlinks, "
                                    "give the target path itself")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise OutputPathError(path, f"is {kind}; t2f replaces regular files only")


def check_output_dir(path: str | os.PathLike, replace: bool = False) -> None:
    """Refuse a directory output that exists and is not a directory.

    A symlink to a directory is followed when files are written inside it; a directory that
    is replaced as a whole (replace=True) must be a real directory, not a symlink.
    """
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return                                             # nothing there to replace; writing reports a bad parent
    if stat.S_ISLNK(mode):
        if replace:
            raise OutputPathError(path, f"is a symlink (to {os.readlink(path)}); give the target directory itself")
        mode = os.stat(path).st_mode if os.path.exists(path) else 0
        if not stat.S_ISDIR(mode):
            raise OutputPathError(path, f"is a symlink (to {os.readlink(path)}) that does not lead to a directory")
    if not stat.S_ISDIR(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a file")
        raise OutputPathError(path, f"is {kind}, not a directory")


# ----------------------------------------------------------------------------
# Inputs: opened only if they are regular files, so a FIFO or a device is refused at once instead of blocking.


class InputPathError(OSError):
    """An input path that t2f refuses to read: not a regular file (a FIFO, a device, a socket, a directory)."""

    def __init__(self, path, reason: str):
        super().__init__(errno.EINVAL, reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def open_regular_file(path: str | os.PathLike, mode: str = "rb"):
    """`open(path, mode)` for reading, refusing anything but a regular file before a byte is read.

    The file is opened with O_NONBLOCK (a FIFO opens at once instead of waiting for a writer)
    and checked with fstat on that descriptor, so nothing can be swapped in between the check
    and the read. Raises InputPathError, or the OSError of a failed open.
    """
    if mode not in ("rb", "r"):
        raise ValueError(f"open_regular_file reads only, not {mode!r}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            kind = next((name for test, name in _KINDS if test(st_mode)), "not a regular file")
            raise InputPathError(path, f"is {kind}; t2f reads regular files only")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, encoding="utf-8" if mode == "r" else None)
    except BaseException:
        os.close(fd)
        raise


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file (following symlinks); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


MAX_JSON_DEPTH = 32          # t2f's own JSON files nest 4 deep at most.
MAX_JSON_BYTES = 16 << 20    # and are a few KB.


def read_json(path: str | os.PathLike):
    """A JSON file t2f wrote (config.json, options.json, manifest.json), read only if it is a regular file of at
    most MAX_JSON_BYTES, and nested at most MAX_JSON_DEPTH deep. ValueError (one line) for anything malformed;
    OSError (InputPathError for a FIFO or device) for a file that cannot be read."""
    with open_regular_file(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; t2f's JSON files are a few KB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    _check_json_depth(text, path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:                     # unreachable after the depth check; kept as the last word
        raise ValueError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels") from None


def _check_json_depth(text: str, path) -> None:
    """Refuse brackets nested deeper than MAX_JSON_DEPTH, outside strings, in one linear scan (before json parses it)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels; t2f's JSON files nest 4 deep")
        elif char in "]}":
            depth -= 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it.

    `path` must be new or a regular file (see check_output_file); it is checked again just
    before the rename.
    """
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        check_output_file(path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None     # a failed write names the file it was for
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside `path`; on success it becomes `path`.

    An existing `path` is replaced only with overwrite=True, only if it is a real directory
    (not a symlink), and only after the new directory is complete; if the swap fails the
    old directory is put back.
    """
    path = Path(path)
    check_output_dir(path, replace=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path, directory=True)
    try:
        yield tmp
        check_output_dir(path, replace=True)
        if path.exists():
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary_sibling(path: Path, directory: bool = False) -> Path:
    """A new file (or directory) .NAME.RANDOM.tmp beside `path`, made 0666 (0777) less the umask, as open() and mkdir()
    make them: the kernel applies the umask, which t2f never reads (reading it means setting it, for every thread)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def write_all(files: dict[str | os.PathLike, bytes]) -> None:
    """Write every file to a temporary sibling first, then rename them all: an OSError leaves none of them."""
    with contextlib.ExitStack() as stack:
        staged = [(stack.enter_context(atomic_path(path)), data) for path, data in files.items()]
        for tmp, data in staged:
            tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_regular_file(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------
# Model directories.


def write_model_files(directory: str | os.PathLike, kind: str, config: dict, state_dict: dict, **extra) -> Path:
    """Write `model.safetensors`, then `config.json` ({"kind", "config", **extra}), each atomically, into `directory`."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        tmp.write_bytes(save(tensors))       # serialized in memory: a failed write is an OSError, not a library error
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
    try:
        meta = read_json(config_path)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    except OSError as e:
        raise WeightsError(f"{config_path}: cannot read ({e.strerror or e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise WeightsError(f"{config_path} describes a {found!r}, not a {kind!r}")
    try:
        tensors = load_file(str(weights_path))
    except PermissionError as e:
        raise WeightsError(f"{weights_path}: cannot read ({e.strerror})") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{weights_path} is truncated or corrupt: {e}") from None
    return meta, tensors


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
