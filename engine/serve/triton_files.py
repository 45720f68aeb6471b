"""What Triton leaves outside its workspace: the Python backend's shared memory in /dev/shm, and its /tmp/python_env_*.

Triton's Python backend creates its shared-memory regions 0644 whatever the umask; they are
tightened to 0600 as soon as they appear (see tighten_shared_memory for what remains). Its
environment manager makes an (empty) directory with the fixed template /tmp/python_env_XXXXXX,
whatever TMPDIR says, and removes it only on a clean exit: t2f-serve notes the one each start
made in the workspace and removes it with the workspace, after a crash too.
"""

from __future__ import annotations

import contextlib
import os
import stat

from t2f.errors import T2FError

SHM_DIR = "/dev/shm"
PYTHON_ENV_GLOB = ("/tmp", "python_env_")    # the Python backend's mkdtemp("/tmp/python_env_XXXXXX"): not TMPDIR


class TritonError(T2FError, RuntimeError):
    """Triton did not start, or Triton stopped; the message is one line."""


# ----------------------------------------------------------------------------
# Shared memory.


def shared_memory_regions(prefix: str) -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(os.path.join(SHM_DIR, name) for name in os.listdir(SHM_DIR) if name.startswith(prefix))
    return []


def tighten_shared_memory(prefix: str) -> list[str]:
    """Make this server's regions 0600; TritonError where one is not ours (someone made it first). The paths tightened.

    What remains: a process of another user that opened a region in the moment between Triton
    creating it (0644) and this call keeps its descriptor. Serve other users' machines from a
    container or a user of its own (docs/serving.md).
    """
    tightened = []
    for path in shared_memory_regions(prefix):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise TritonError(f"shared memory {path}: {e.strerror}; another user's file has this server's name") from None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid():
                raise TritonError(f"shared memory {path} belongs to uid {info.st_uid}, not this server's; refusing to serve")
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
                tightened.append(path)
        finally:
            os.close(fd)
    return tightened


def remove_shared_memory(prefix: str) -> None:
    for path in shared_memory_regions(prefix):
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == os.getuid():
                os.unlink(path)


# ----------------------------------------------------------------------------
# python_env directories.


def new_python_envs(before: set[str]) -> list[str]:
    """This user's /tmp/python_env_* directories that are not in `before`."""
    root, prefix = PYTHON_ENV_GLOB
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith(prefix) and path not in before:
                with contextlib.suppress(OSError):
                    info = os.lstat(path)
                    if info.st_uid == os.getuid() and stat.S_ISDIR(info.st_mode):
                        found.append(path)
    return found


def remove_python_envs(workspace: str) -> None:
    """Remove the python_env directories recorded in `workspace` (empty ones only: rmdir never removes another's files)."""
    with contextlib.suppress(OSError), open(os.path.join(workspace, "python_envs")) as f:
        for path in f.read().split("\n"):
            root, prefix = PYTHON_ENV_GLOB
            if os.path.dirname(path) == root and os.path.basename(path).startswith(prefix):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
