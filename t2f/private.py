"""Places only this user can change: the folders t2f loads code, graphs and blobs from, and who holds a lock.

Another local user who can write a folder that t2f loads from can make t2f run their code (a
Python file in Inductor's cache, a compiled OpenVINO blob, a Triton `model.py`) or change its
images (an ONNX graph beside a manifest that names its checksum). So t2f creates each such folder
0700, and checks it before each use (`private_dir`): with lstat, the folder must be a real
directory (or a symlink of the user or root to one) owned by the user and writable by nobody
else; and no directory above it may let another user rename or replace it: each must belong to
the user or root and be writable by its owner alone, or be sticky (as /tmp is), where nobody
can rename what another user owns. Where a symlink is on the way, the directories above the
folder it leads to are checked the same way. This is OpenSSH's rule for ~/.ssh (StrictModes).
A directory on a read-only file system passes whoever owns it (a cache mounted read-only into
a container): nobody can change it there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from .errors import T2FError, UsageError
from .files import printable

CACHE_FIX = "set T2F_CACHE to a directory of your own"      # the way out where a cache folder is refused


class UnsafePathError(T2FError, OSError):
    """A folder (or lock file) that t2f refuses to use because another user could change it; the message is one line."""

    def __init__(self, path, message: str):
        super().__init__(errno.EPERM, message, str(path))

    def __str__(self) -> str:
        return self.strerror


def user_name(uid: int) -> str:
    """ "uid 65534 (nobody)", or "uid N" where the user has no name."""
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def private_dir(root: str | os.PathLike, *parts: str, fix: str = CACHE_FIX) -> Path:
    """ROOT/PARTS..., with each missing directory on the way created 0700; UnsafePathError (one line naming the
    directory and `fix`, the way out) where another user could change it.

    ROOT and each of PARTS must be the user's own and writable by nobody else; the directories above ROOT
    may belong to root or be sticky (see the module's docstring).
    """
    root = Path(os.path.abspath(root))
    path = root.joinpath(*parts)
    own = {root.joinpath(*parts[:i]) for i in range(len(parts) + 1)}
    for directory in [*reversed(path.parents), path]:
        _check_dir(directory, directory in own, fix)
    real = Path(os.path.realpath(path))
    if real != path:                                   # a symlink on the way: what is above the place it leads to
        for directory in reversed(real.parents):
            _check_dir(directory, False, fix)
    return path


def _check_dir(directory: Path, own: bool, fix: str) -> None:
    """Create `directory` 0700 where it is missing, then refuse it where another user could change it (own: it must be
    the user's alone; else it may belong to root, or be sticky)."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):     # another process may make it at the same moment: checked below
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)                 # exactly 0700, whatever the umask
        info = os.lstat(directory)
    uid = os.getuid()
    if stat.S_ISLNK(info.st_mode):
        if info.st_uid not in (uid, 0):
            raise UnsafePathError(directory, f"{directory} is a symlink owned by {user_name(info.st_uid)}, who could point it "
                                             f"anywhere; remove it, or {fix}")
        info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(directory, f"{directory} is not a directory; {fix}")
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return                                         # a read-only file system (a model cache mounted read-only): nobody changes it
    if info.st_uid != uid and (own or info.st_uid != 0):
        way_out = f"chown it to yourself and chmod 700 it, or {fix}" if own else fix
        raise UnsafePathError(directory, f"{directory} is owned by {user_name(info.st_uid)}, not by you, who could change "
                                         f"what is loaded from it; {way_out}")
    if info.st_mode & 0o022 and (own or not info.st_mode & stat.S_ISVTX):
        raise UnsafePathError(directory, f"{directory} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}), "
                                         f"who could change what is loaded from it; chmod {'700' if own else 'go-w'} it, or {fix}")


# ----------------------------------------------------------------------------
# One process at a time in a directory: an flock on DIR/.t2f.lock, a file only this user can open.

LOCK_NAME = ".t2f.lock"
LOCK_TIMEOUT_S = 1800        # How long wait=True waits for a lock; T2F_LOCK_TIMEOUT (seconds) overrides it.


class DirectoryInUse(T2FError):
    """Another process holds the directory's lock."""


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str, wait: bool = False):
    """Hold an exclusive lock on `directory` (flock on its .t2f.lock, created 0600 if needed) while the block runs.

    A second process fails at once with DirectoryInUse naming the holder (lock_holder: the
    kernel's record, never a dead pid), or with wait=True (a cache that another process is
    filling) waits for it, up to T2F_LOCK_TIMEOUT seconds (LOCK_TIMEOUT_S by default), then fails
    the same way. A lock file of another user is refused (UnsafePathError), and t2f's own is made
    0600, so no other user can open it and hold the lock. The kernel drops the lock when the
    holder exits, even on kill -9, so a stale lock file never blocks anyone.
    """
    import fcntl
    import sys
    import time

    timeout = lock_timeout() if wait else 0.0
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        owner = _owner(path)
        if e.errno == errno.ELOOP or owner not in (None, os.getuid()):
            raise UnsafePathError(path, _foreign_lock(path, owner)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise UnsafePathError(path, _foreign_lock(path, info.st_uid, info.st_mode))
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)                       # an earlier t2f's lock file (0644): nobody else opens it from now on
        deadline, said = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if not wait:
                raise DirectoryInUse(f"{directory} is in use by another {what}: {lock_holder(fd)}; wait for it to finish or "
                                     "stop it")
            if time.monotonic() >= deadline:
                raise DirectoryInUse(f"{path} is still held by {lock_holder(fd)} after {timeout:g} s of waiting; stop it, or "
                                     "set T2F_LOCK_TIMEOUT=SECONDS to wait longer")
            if not said:                               # the holder is looked up for the lines only, not on every try
                print(f"waiting for {path}, held by {lock_holder(fd)} (up to {timeout:g} s)", file=sys.stderr, flush=True)
                said = True
            time.sleep(max(0.0, min(0.1, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)
        yield
    finally:
        os.close(fd)                                   # releases the lock


def lock_timeout() -> float:
    """Seconds a lock is waited for: T2F_LOCK_TIMEOUT, else LOCK_TIMEOUT_S; UsageError (one line) for a bad value."""
    text = os.environ.get("T2F_LOCK_TIMEOUT", "").strip()
    try:
        value = float(text) if text else float(LOCK_TIMEOUT_S)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise UsageError(f"T2F_LOCK_TIMEOUT must be a number of seconds, got {text[:40]!r}")
    return value


def _owner(path) -> int | None:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None


def _foreign_lock(path, owner: int | None, mode: int | None = None) -> str:
    """Why the lock file `path` is refused: not a regular file (a symlink, a FIFO), or another user's."""
    if mode is not None and not stat.S_ISREG(mode) or owner in (None, os.getuid()):
        return f"{path} is not a regular file; remove it (a lock file is a regular file of its own)"
    return f"{path} is owned by {user_name(owner)}, not by you, who could hold it forever; remove it"


# ----------------------------------------------------------------------------
# Who holds a lock: the kernel's own record (/proc/locks), never a pid that a file merely names.


def lock_holder(fd: int) -> str:
    """Who holds the flock on the open file `fd`: "pid N on HOST (COMMAND)" for a live process of this user, "a
    process of another user (...)", the holder the file records where it is on another host (a network file
    system), else "unknown". A pid is named only where the kernel reports it holding the lock and it is alive."""
    info = os.fstat(fd)
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with contextlib.suppress(OSError), open("/proc/locks", encoding="ascii", errors="replace") as f:
        for line in f:
            fields = line.split()                      # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:56789 0 EOF"; a waiter has "->"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
                described = describe_process(int(fields[4]))
                if described:
                    return described
    recorded = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    host = recorded.split(" on ", 1)[1].split(" ", 1)[0] if recorded.startswith("pid ") and " on " in recorded else None
    if host and host != socket.gethostname():
        return f"{printable(recorded, limit=160)}, as the lock file records"
    return "unknown"


def describe_process(pid: int) -> str | None:
    """ "pid N on HOST (COMMAND)" for a live process of this user, "a process of another user (uid U, pid N)", or None
    where no process `pid` is alive (or visible)."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode("utf-8", "replace") for a in f.read(4096).split(b"\0") if a]
    except (OSError, ValueError):
        return None
    if owner != os.getuid():
        return f"a process of another user ({user_name(owner)}, pid {pid})"
    if len(args) > 1 and os.path.basename(args[0]).startswith("python") and not args[1].startswith("-"):
        args = args[1:]                                # a script (t2f-export): its name, not its interpreter's
    command = " ".join([os.path.basename(args[0]), *args[1:]]) if args else "?"
    return f"pid {pid} on {socket.gethostname()} ({printable(command, limit=120)})"
