"""Files, read and written safely, with the standard library only: atomic writes, bounded JSON, output and input
checks, checksums, and `printable` for what a file or a client names in a log line.

    atomic_path(path, mode)    a temporary sibling, renamed over `path` on success (deleted on failure)
    atomic_dir(path)           the same for a whole directory
    write_all(files, mode)     several files, every one or none; write_json(path, data) one JSON file
    read_json(path)            a JSON file t2f wrote: a regular file, at most MAX_JSON_BYTES, MAX_JSON_DEPTH deep
    json_depth_exceeds(t, n)   whether JSON text nests deeper than n, in one scan, before any parser sees it
    check_output_file / check_output_dir      refuse an output t2f must not replace (a symlink, a FIFO, a device)
    open_regular_file / is_regular_file       read only regular files (a FIFO or a device is refused at once)
    sha256_file(path)          the checksum manifests record
    printable(text)            text safe for one log line

This module imports nothing outside the standard library (and t2f.errors), so the serving front (its
JSON depth check, its log lines) and the Triton repository writer use it without torch, numpy or
click (tests/test_files.py imports it with those made unimportable). The folders only this user may
change and the one-process-at-a-time directory locks are t2f.private's (also standard library only):
both are about who may change or hold a directory, where this module is about one file's bytes (and
together they would pass 420 lines). Model directories (`config.json` beside `model.safetensors`)
and weight fingerprints need torch and are t2f.io's.
"""

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

from .errors import T2FError


def printable(text: str, limit: int = 500) -> str:
    """`text` safe for one log or console line: characters that are not printable (newlines, escape sequences, NUL,
    bidi controls) written as Python escapes, and at most `limit` characters kept."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text) if not text.isprintable() else text


# ----------------------------------------------------------------------------
# Outputs: what a path may be.


class PathError(T2FError, OSError):
    """A path t2f refuses, with why: "PATH: REASON". An OSError too, so an `except OSError` still catches it."""

    code = errno.EINVAL

    def __init__(self, path, reason: str):
        super().__init__(self.code, reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class OutputPathError(PathError):
    """An output path that t2f refuses to write: it exists and is not what t2f replaces."""

    code = errno.EEXIST


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int, otherwise: str) -> str:
    return next((name for test, name in _KINDS if test(mode)), otherwise)


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
        raise OutputPathError(path, f"is {_kind(mode, 'not a regular file')}; t2f replaces regular files only")


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
        raise OutputPathError(path, f"is {_kind(mode, 'a file')}, not a directory")


# ----------------------------------------------------------------------------
# Inputs: opened only if they are regular files, so a FIFO or a device is refused at once instead of blocking.


class InputPathError(PathError):
    """An input path that t2f refuses to read: not a regular file (a FIFO, a device, a socket, a directory)."""

    code = errno.EINVAL


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
            raise InputPathError(path, f"is {_kind(st_mode, 'not a regular file')}; t2f reads regular files only")
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 (hex) of a regular file's bytes, read `chunk` bytes at a time."""
    digest = hashlib.sha256()
    with open_regular_file(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Bounded JSON.

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
    if json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise ValueError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels; t2f's JSON files nest 4 deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:                     # unreachable after the depth check; kept as the last word
        raise ValueError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels") from None


def read_json_as(path: str | os.PathLike, error: type[Exception], missing: str | None = None):
    """read_json, with each failure as one line of `error` (a T2FError class of the caller's subject): `missing` where
    the file is not there (None: as any file that cannot be read), the reason where it is malformed, and
    "PATH: cannot read (REASON)" where it cannot be read."""
    try:
        return read_json(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        if missing is not None:
            raise error(missing) from None
        reason = e.strerror or e
    except ValueError as e:
        raise error(str(e)) from None
    except OSError as e:
        reason = e.strerror or e
    raise error(f"{path}: cannot read ({reason})")


def json_depth_exceeds(text: bytes | str, limit: int) -> bool:
    """True where JSON `text` nests [ and { deeper than `limit` (strings skipped), in one linear scan, without parsing
    it: run before a parser, whose recursion a crafted file (300,000 `[`) would otherwise exhaust."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    depth, i, n = 0, 0, len(data)
    find = data.find
    while i < n:
        c = data[i]
        if c == 0x22:                                  # a string: skip to its closing quote
            j = i + 1
            while True:
                j = find(b'"', j)
                if j < 0:
                    return False                       # unterminated: the parser refuses it
                k = j - 1
                while data[k] == 0x5C:                  # count the backslashes before the quote
                    k -= 1
                if (j - 1 - k) % 2 == 0:
                    break
                j += 1
            i = j + 1
            continue
        if c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
        i += 1
    return False


# ----------------------------------------------------------------------------
# Atomic writes: a temporary sibling, then os.replace. Modes are given when a file is created, never by the umask's
# toggle (reading the umask means setting it, for every thread of the process).


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None):
    """Yield a temporary path beside `path`; on success flush it to disk and rename it over `path`, else delete it.

    `path` must be new or a regular file (see check_output_file); it is checked again just
    before the rename. The file gets `mode` exactly (0600 while it is written), or with
    mode=None what open() would give it: 0666 less the umask.
    """
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path, mode=0o666 if mode is None else 0o600)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)                               # on disk before it takes the name: a crash leaves old or new
        finally:
            os.close(fd)
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


def _temporary_sibling(path: Path, directory: bool = False, mode: int = 0o666) -> Path:
    """A new file .NAME.RANDOM.tmp beside `path`, created with `mode` less the umask as open() makes it (a directory:
    0777 less the umask, as mkdir() makes it); the kernel applies the umask, which t2f never reads."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


def write_all(files: dict[str | os.PathLike, bytes], mode: int | None = None) -> None:
    """Write every file to a temporary sibling first, then rename them all: an OSError while writing (a full disk, say)
    leaves none of them. The renames come last, one by one; one that fails (rare) leaves those already renamed.

    mode: each file's exact mode (say 0o600); None = 0666 less the umask, as open() gives."""
    with contextlib.ExitStack() as stack:
        staged = [(stack.enter_context(atomic_path(path, mode)), data) for path, data in files.items()]
        for tmp, data in staged:
            tmp.write_bytes(data)


def write_json(path: str | os.PathLike, data) -> None:
    """`data` as indented JSON with sorted keys, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
