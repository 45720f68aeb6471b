"""Downloads of published weights: once, into a cache directory, checksummed, atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import T2FError
from .files import atomic_path
from .private import private_dir


class DownloadError(T2FError):
    """A weights file that is not cached and could not be downloaded or verified."""


@dataclasses.dataclass(frozen=True)
class WeightSource:
    url: str                      # Where the file is published.
    filename: str                 # Name in the cache directory.
    sha256: tuple[str, ...]       # Accepted sha256 digests of the file.
    licence: str                  # Licence of the weights, in one line.
    flag: str                     # The command-line flag that takes a local copy instead.


def cache_dir() -> Path:
    """$T2F_CACHE, else ~/.cache/t2f: its path only. Each user of a folder in it creates and checks that folder with
    t2f.private.private_dir (0700, no other user can change it) before it loads anything from there."""
    return Path(os.environ.get("T2F_CACHE") or Path.home() / ".cache" / "t2f")


def fetch(source: WeightSource, directory: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The cached file for `source`, downloading and verifying it first if it is missing.

    A file enters the cache only after its checksum matched, so a cached file is trusted.
    Set T2F_OFFLINE=1 to fail at once instead of trying the network. The directory is created 0700 and refused
    (UnsafePathError) where another user could change it.
    """
    directory = private_dir(directory if directory is not None else cache_dir(),
                            fix="use --cache DIR or set T2F_CACHE to a directory of your own")
    dest = directory / source.filename
    if dest.is_file():
        return dest
    hint = f"download it and give its path instead of the preset name (e.g. {source.flag} /path/to/{source.filename})"
    if os.environ.get("T2F_OFFLINE") == "1":
        raise DownloadError(f"{source.filename} is not in {directory} and T2F_OFFLINE=1; {hint} (from {source.url})")
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(source.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            from tqdm import tqdm

            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=source.filename, disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            if digest.hexdigest() not in source.sha256:
                raise DownloadError(f"{source.url} downloaded with sha256 {digest.hexdigest()}, which is not the published "
                                    f"checksum; nothing was cached; {hint}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{source.filename} is not in {directory} and could not be downloaded from {source.url} ({reason}); {hint}") from None
    return dest
