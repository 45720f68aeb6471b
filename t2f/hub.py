"""Mappers on the Hugging Face Hub: `hf-hub:ORG/NAME` and `hf-hub:ORG/NAME@REVISION`, through huggingface_hub's own API.

A Hub mapper is the files of a run directory that t2f reads (config.json, model.safetensors and, for
KNN mode, bank.safetensors), downloaded by `huggingface_hub.snapshot_download` into the Hugging Face
cache and then loaded exactly like a local directory: the same bounded config, the same weight checks
before anything is allocated, no code run (JSON and safetensors only, never a pickle, never remote code).

The environment is read at each call, not once: the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else
huggingface_hub's default; downloads are off with T2F_OFFLINE=1 or HF_HUB_OFFLINE=1 (then only the
cache is read, through local_files_only; os.environ is never changed). Every failure is one `HubError`
line naming the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path

from .errors import T2FError, UsageError, first_line

PREFIX = "hf-hub:"
HUB_URL = "https://huggingface.co"

# ORG and NAME: huggingface_hub's rule (letters, digits, "-", "_", "."; not starting or ending with "-" or ".";
# at most 96 characters; no "--" or ".."; not ending in ".git").
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
# A revision: a branch, a tag, "refs/pr/N" or a commit hash; "/"-separated parts as git allows them, which also keeps
# it from naming a path outside the cache's refs/ folder.
_REVISION_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_REVISION = 255


class HubError(T2FError):
    """A Hub mapper that cannot be had: not cached while offline, no such repository, revision or file, no network."""


class HubIdError(UsageError):
    """A malformed `hf-hub:` id (a usage error: exit code 2 in the commands)."""


@dataclasses.dataclass(frozen=True)
class HubId:
    repo_id: str                  # ORG/NAME
    revision: str | None = None   # branch, tag or commit; None = the default branch (main)

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_hub_id(source) -> bool:
    """Whether `source` names a Hub mapper (starts with "hf-hub:"); its syntax is checked by `parse`."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> HubId:
    """"hf-hub:ORG/NAME[@REVISION]" -> HubId; HubIdError (one line) for anything else, before huggingface_hub is called."""
    expected = f"expected {PREFIX}ORG/NAME or {PREFIX}ORG/NAME@REVISION"
    if not is_hub_id(source):
        raise HubIdError(f"{source!r} is not a Hub id: {expected}")
    repo_id, at, revision = source[len(PREFIX):].partition("@")
    org, slash, name = repo_id.partition("/")
    if not (slash and _NAME.fullmatch(org) and _NAME.fullmatch(name)) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith(".git"):
        raise HubIdError(f"{source!r} is not a Hub id: {expected}, ORG and NAME of at most 96 letters, digits, '-', '_' "
                         "or '.' (not at either end, no '--' or '..')")
    if at and not _valid_revision(revision):
        raise HubIdError(f"{source!r} has a malformed revision {revision!r}: a branch, tag or commit of letters, digits, "
                         "'-', '_', '.' and '/' (no '..', no part starting with '.')")
    return HubId(repo_id, revision if at else None)


def _valid_revision(revision: str) -> bool:
    parts = revision.split("/")
    return (0 < len(revision) <= MAX_REVISION and all(_REVISION_PART.fullmatch(p) for p in parts) and ".." not in revision
            and not revision.endswith((".lock", ".")))


# ----------------------------------------------------------------------------
# The environment, read at each call.


def cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default.

    Read from the environment now: huggingface_hub reads it once, when it is first imported.
    """
    for value, sub in ((os.environ.get("HF_HUB_CACHE"), ""), (os.environ.get("HF_HOME"), "hub")):
        if value:
            return Path(os.path.expandvars(os.path.expanduser(value))) / sub
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_reason() -> str | None:
    """The variable that turns downloads off ("T2F_OFFLINE=1" or "HF_HUB_OFFLINE=1"), or None where they are on."""
    if os.environ.get("T2F_OFFLINE") == "1":
        return "T2F_OFFLINE=1"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE=1"
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else None        # as huggingface_hub read it at import


@contextlib.contextmanager
def offline_scope(offline: bool):
    """huggingface_hub offline inside the block, for a library that calls it without local_files_only (open_clip).

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE`; that value is set for the
    block and put back after it. os.environ is not touched. Other threads of the process see it during the block.
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


# ----------------------------------------------------------------------------
# Downloads.


def download(hub_id: HubId, files: tuple[str, ...], progress: bool = True) -> Path:
    """The local snapshot directory of `hub_id` holding `files` (fetched into the Hugging Face cache where missing).

    Offline, only the cache is read. HubError (one line naming the repository) for every failure, and for a
    snapshot that lacks one of `files`.
    """
    from huggingface_hub import errors, snapshot_download

    from . import __version__

    offline, where = offline_reason(), cache_dir()
    quiet = {} if progress else dict(tqdm_class=_quiet_tqdm())
    try:
        path = Path(snapshot_download(hub_id.repo_id, repo_type="model", revision=hub_id.revision, cache_dir=where,
                                      allow_patterns=list(files), local_files_only=offline is not None,
                                      library_name="t2f", library_version=__version__, **quiet))
    except errors.LocalEntryNotFoundError as e:
        if offline is not None:
            raise HubError(f"{hub_id} is not in the Hugging Face cache ({where}) and downloads are off ({offline}): "
                           f"run once online, or pass --mapper DIR with a local copy") from None
        raise HubError(f"cannot reach the Hugging Face Hub for {hub_id} and it is not in the cache ({where}): "
                       f"{first_line(e.__cause__ or e, typed=True)}") from None
    except errors.GatedRepoError:
        raise HubError(f"{hub_id} is gated: accept its conditions on {HUB_URL}/{hub_id.repo_id} and log in "
                       "(hf auth login, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{hub_id}: no such model repository on the Hugging Face Hub (a private one needs hf auth login "
                       "or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{hub_id}: the repository {hub_id.repo_id} has no revision {hub_id.revision!r}") from None
    except errors.DisabledRepoError:
        raise HubError(f"{hub_id}: the repository is disabled on the Hugging Face Hub") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"the Hugging Face Hub refused {hub_id}: {first_line(e, typed=True)}") from None
    except OSError as e:                                       # the cache cannot be written, the disk is full, ...
        raise HubError(f"cannot download {hub_id} into {where}: {e.strerror or first_line(e, typed=True)}") from None
    except Exception as e:
        if not _is_transport_error(e):
            raise
        raise HubError(f"cannot reach the Hugging Face Hub for {hub_id}: {first_line(e, typed=True)}") from None
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise HubError(f"{hub_id} holds no {', '.join(missing)}: a t2f mapper repository holds config.json and "
                       "model.safetensors (and bank.safetensors for --mode knn)")
    return path


def _is_transport_error(error: Exception) -> bool:
    """An HTTP client's own error (a proxy refusing, a dropped connection) that huggingface_hub lets through."""
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


def _quiet_tqdm():
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet
