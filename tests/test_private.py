"""Another local user against t2f: the cache and its folders, `--write-repository`, locks, leftovers of a killed export.

Folders another user owns are made with os.chown to uid 65534 (nobody), which needs root; those
cases skip where the tests do not run as root. Group- and world-writable folders need no root.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
import types

import pytest

from t2f.engine.cli import main as infer_main
from t2f.engine.serve import main as serve_main
from t2f.export.cli import main as export_main
from t2f.private import UnsafePathError

from helpers import TINY, assert_one_error_line, child_holding, tiny_pipeline

OTHER = 65534                   # nobody
as_root = pytest.mark.skipif(os.getuid() != 0, reason="making a folder another user's (os.chown) needs root")


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _plant(path, how: str, files: dict[str, bytes] = {}) -> None:    # noqa: B006  (read only)
    """A folder `path` holding `files`, made as another user would leave it: theirs ("other"), or group/world-writable."""
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if how == "other":
        for p in [path, *path.rglob("*")]:
            os.lchown(p, OTHER, OTHER)
    else:
        path.chmod(0o770 if how == "group-writable" else 0o777)


@pytest.fixture(scope="module")
def models():
    from t2f.engine.backends import Models

    pipe = tiny_pipeline()
    return Models(pipe.generator, pipe.clip, pipe.mapper)


# ----------------------------------------------------------------------------
# The cache: created 0700; a folder t2f loads code, graphs or blobs from is refused where another user could change it.


def test_the_cache_and_its_folders_are_created_0700(tmp_path, monkeypatch, models):
    from t2f.engine.backends.ondemand import ensure_onnx, onnx_cache_dir
    from t2f.engine.backends.openvino_runtime import openvino_cache
    from t2f.engine.backends.pytorch import inductor_cache
    from t2f.engine.serve.tritonserver import workspace_parent
    from t2f.precision import Precision

    cache = tmp_path / "home" / ".cache" / "t2f"                 # nothing of it exists yet
    monkeypatch.setenv("T2F_CACHE", str(cache))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("t2f read the umask"))
    monkeypatch.setattr("t2f.export.onnx_export.export_artifacts", lambda *a, **k: None)   # the folders, not the graphs
    openvino_cache()
    assert inductor_cache() == str(cache / "inductor")
    workspace_parent()
    ensure_onnx(models, Precision.FP32)
    for folder in (tmp_path / "home", tmp_path / "home" / ".cache", cache, cache / "openvino", cache / "inductor",
                   cache / "serve", cache / "onnx", onnx_cache_dir(models)):
        assert _mode(folder) == 0o700, folder
    assert _mode(onnx_cache_dir(models) / ".t2f.lock") == 0o600
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ               # set only around compiles (inductor_environment)


CACHE_FOLDERS = {                                                    # folder: what an attacker plants there
    "inductor": {"ab/cabcdef.py": b"import os; os.system('id > /tmp/pwned')\n"},
    "openvino": {"0123456789.blob": b"a compiled graph of theirs"},
    "serve": {},
    "onnx": {"manifest.json": b'{"onnx": {}}', "synthesis.onnx": b"their graph"},   # (the attack's checksums matched)
    "clip": {"models--timm--vit_base_patch32_clip_224.openai/blobs/0123": b"their pickle"},
}


def _use(folder: str, cache, models):
    from t2f.engine.backends.ondemand import ensure_onnx
    from t2f.engine.backends.openvino_runtime import openvino_cache
    from t2f.engine.backends.pytorch import inductor_cache
    from t2f.engine.serve.tritonserver import workspace_parent
    from t2f.precision import Precision

    if folder == "inductor":
        return inductor_cache()
    if folder == "openvino":
        return openvino_cache()
    if folder == "serve":
        return workspace_parent(str(cache))
    if folder == "clip":
        from t2f.clip import load_clip

        return load_clip("ViT-B-32:openai")                   # refused before open_clip looks for its weights there
    return ensure_onnx(models, Precision.FP32)


@pytest.mark.parametrize("how", ["other", "group-writable", "world-writable"])
@pytest.mark.parametrize("folder", sorted(CACHE_FOLDERS))
def test_a_cache_folder_another_user_can_change_is_refused(folder, how, tmp_path, monkeypatch, models):
    from t2f.engine.backends.ondemand import onnx_cache_dir

    if how == "other" and os.getuid() != 0:
        pytest.skip("making a folder another user's (os.chown) needs root")
    cache = tmp_path / "cache"
    monkeypatch.setenv("T2F_CACHE", str(cache))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache.mkdir(mode=0o700)
    target = onnx_cache_dir(models) if folder == "onnx" else cache / folder
    files = CACHE_FOLDERS[folder]
    _plant(target, how, files)
    with pytest.raises(UnsafePathError) as refused:
        _use(folder, cache, models)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(target))
    assert ("is owned by uid 65534" if how == "other" else "is writable by other users") in message
    assert message.endswith("chmod 700 it, or " + ("use --cache DIR or set T2F_CACHE to a directory of your own" if folder in ("serve", "clip")
                                                   else "set T2F_CACHE (or TORCHINDUCTOR_CACHE_DIR) to a directory of your own"
                                                   if folder == "inductor" else "set T2F_CACHE to a directory of your own"))
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == sorted(os.path.basename(f) for f in files)   # nothing added
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") is None            # Inductor was not pointed at it


@pytest.mark.parametrize("how", ["other", "world-writable"])
def test_a_cache_root_another_user_can_change_is_refused_by_every_command(how, tmp_path, run_cli, monkeypatch):
    """The cache itself; t2f-infer (its ONNX export into the cache) and t2f-serve (its workspace) say so in one line."""
    if how == "other" and os.getuid() != 0:
        pytest.skip("making a folder another user's (os.chown) needs root")
    cache = tmp_path / "cache"
    _plant(cache, how)
    monkeypatch.setenv("T2F_CACHE", str(cache))
    result = run_cli(infer_main, [*TINY, "a face", "--backend", "onnxruntime", "--out", "face.png"], tmp_path)
    assert_one_error_line(result, 1, f"{cache} is ", "set T2F_CACHE to a directory of your own")
    assert not (tmp_path / "face.png").exists() and not (cache / "onnx").exists()
    result = run_cli(serve_main, [*TINY, "--device", "cpu", "--cache", cache], tmp_path)
    assert_one_error_line(result, 1, f"{cache} is ", "use --cache DIR or set T2F_CACHE to a directory of your own")
    assert not (cache / "serve").exists()


@as_root
def test_a_symlink_planted_by_another_user_is_refused(tmp_path, monkeypatch):
    from t2f.engine.backends.openvino_runtime import openvino_cache

    cache, theirs = tmp_path / "cache", tmp_path / "theirs"
    cache.mkdir(mode=0o700)
    theirs.mkdir(mode=0o700)                       # a folder of this user's that the link leads to: the link is what is refused
    (cache / "openvino").symlink_to(theirs)
    os.lchown(cache / "openvino", OTHER, OTHER)
    monkeypatch.setenv("T2F_CACHE", str(cache))
    with pytest.raises(UnsafePathError, match=r"openvino is a symlink owned by uid 65534 .*; remove it, or set T2F_CACHE"):
        openvino_cache()
    os.lchown(cache / "openvino", os.getuid(), os.getgid())      # the user's own link to the user's own folder is fine
    assert os.path.realpath(openvino_cache()) == str(theirs)


def test_the_directories_above_the_cache_may_not_let_others_swap_it(tmp_path, monkeypatch):
    """Above the cache, a directory writable by others lets them rename the cache and put their own in its place,
    unless it is sticky (as /tmp is): there nobody renames what another user owns."""
    from t2f.engine.backends.openvino_runtime import openvino_cache

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("T2F_CACHE", str(shared / "me" / "cache"))
    with pytest.raises(UnsafePathError, match=rf"^{shared} is writable by other users \(mode 0777\).*chmod go-w it"):
        openvino_cache()
    assert not (shared / "me").exists()
    shared.chmod(0o1777)
    assert openvino_cache() == shared / "me" / "cache" / "openvino"
    assert _mode(shared / "me") == _mode(shared / "me" / "cache") == 0o700


def test_a_cache_on_a_read_only_file_system_passes_whoever_owns_it(tmp_path, monkeypatch):
    """A model cache mounted read-only (a container's volume, group-writable for its fsGroup): nobody can change it."""
    from t2f.engine.backends.openvino_runtime import openvino_cache

    cache = tmp_path / "mounted"
    _plant(cache / "openvino", "group-writable")
    cache.chmod(0o2770)
    monkeypatch.setenv("T2F_CACHE", str(cache))
    with pytest.raises(UnsafePathError, match="mounted is writable by other users"):
        openvino_cache()
    real_statvfs = os.statvfs

    def statvfs(path):                                               # the cache's file system, mounted read-only
        flags = real_statvfs(path).f_flag
        return types.SimpleNamespace(f_flag=flags | os.ST_RDONLY if str(path).startswith(str(cache)) else flags)

    monkeypatch.setattr(os, "statvfs", statvfs)
    assert openvino_cache() == cache / "openvino"


@as_root
def test_downloads_are_not_trusted_from_a_cache_of_another_user(tmp_path):
    from t2f.download import WeightSource, fetch

    cache = tmp_path / "cache"
    _plant(cache, "other", {"g.pkl": b"their weights"})
    source = WeightSource("https://example.invalid/g.pkl", "g.pkl", ("0" * 64,), "none", "--generator")
    with pytest.raises(UnsafePathError, match=rf"^{cache} is owned by uid 65534.*use --cache DIR or set T2F_CACHE"):
        fetch(source, cache, progress=False)


# ----------------------------------------------------------------------------
# --write-repository DIR: Triton runs the model.py it finds there.


@pytest.mark.parametrize("how", ["other", "group-writable", "parent-world-writable"])
def test_write_repository_refuses_a_folder_another_user_can_change(how, tmp_path, run_cli):
    if how == "other" and os.getuid() != 0:
        pytest.skip("making a folder another user's (os.chown) needs root")
    out = tmp_path / "shared" / "repository"
    if how == "parent-world-writable":
        out.parent.mkdir()
        out.parent.chmod(0o777)
        culprit = out.parent
    else:
        _plant(out, how, {"t2f/1/model.py": b"import os; os.system('id > /tmp/pwned')\n"})
        culprit = out
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_cli(serve_main, [*TINY, "--device", "cpu", "--write-repository", out], tmp_path)
    line = assert_one_error_line(result, 1, f"--write-repository {out}: {culprit} is ", "choose a directory of your own")
    assert ("owned by uid 65534" if how == "other" else "writable by other users") in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before           # nothing written, nothing replaced
    assert out.exists() == (how != "parent-world-writable")


def test_write_repository_into_a_sticky_directory_is_private(tmp_path, run_cli):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    out = sticky / "a" / "repository"
    result = run_cli(serve_main, [*TINY, "--device", "cpu", "--write-repository", out], tmp_path)
    assert result.exit_code == 0, result.output
    assert [_mode(p) for p in (sticky / "a", out, out / "t2f", out / "t2f" / "1")] == [0o700] * 4
    assert _mode(out / "t2f" / "1" / "model.py") == 0o644                     # readable by the container's user


def test_write_repository_refuses_a_planted_symlink_and_replaces_nothing(tmp_path, run_cli):
    out = tmp_path / "repository"
    assert run_cli(serve_main, [*TINY, "--device", "cpu", "--write-repository", out], tmp_path).exit_code == 0
    target, link = tmp_path / "elsewhere.py", out / "t2f_image" / "1" / "model.py"
    target.write_text("not t2f's\n")
    link.unlink()
    link.symlink_to(target)
    (out / "t2f" / "config.pbtxt").write_text("an older config\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    result = run_cli(serve_main, [*TINY, "--device", "cpu", "--write-repository", out], tmp_path)
    assert_one_error_line(result, 1, f"--write-repository {out}: {link}: is a symlink (to {target})")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()} == before   # every file or none
    assert link.is_symlink() and target.read_text() == "not t2f's\n"
    assert sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp")) == []                      # no temporary left


# ----------------------------------------------------------------------------
# Locks: private, and every wait bounded, ending in one line that names the lock and its live holder.


def _holding(fd: int, user: int | None = None):
    """A child process (of another user where `user` is given) holding an flock on the open file `fd`, until the block ends."""
    code = f"import fcntl, sys; fcntl.flock({fd}, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    python, prefix = sys.executable, []
    if user is not None:
        python = shutil.which("python3", path="/usr/bin:/bin") or pytest.skip("no system python3 that another user can run")
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is not installed")
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return child_holding([*prefix, python, "-S", "-c", code], pass_fds=(fd,), cwd="/")


def _open_lock(directory, mode=0o600):
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory / ".t2f.lock", os.O_RDWR | os.O_CREAT, mode)


def test_a_wait_for_the_cache_lock_ends_in_one_line_naming_its_holder(tmp_path, monkeypatch, models, capfd):
    from t2f.engine.backends.ondemand import ensure_onnx, onnx_cache_dir
    from t2f.private import DirectoryInUse
    from t2f.precision import Precision

    monkeypatch.setenv("T2F_LOCK_TIMEOUT", "1")
    out = onnx_cache_dir(models)
    fd = _open_lock(out)
    os.pwrite(fd, b"pid 999999 on elsewhere-and-dead (t2f-export)\n", 0)   # what the file says is not who holds it
    start = time.monotonic()
    with _holding(fd) as holder, pytest.raises(DirectoryInUse) as waited:
        ensure_onnx(models, Precision.FP32)
    os.close(fd)
    assert 1 <= time.monotonic() - start < 30
    message = str(waited.value)
    assert message.startswith(f"{out / '.t2f.lock'} is still held by pid {holder.pid} on ")
    assert "(python -S -c import fcntl" in message and "after 1 s of waiting" in message and "999999" not in message
    assert "T2F_LOCK_TIMEOUT=SECONDS" in message and "\n" not in message
    assert f"waiting for {out / '.t2f.lock'}, held by pid {holder.pid}" in capfd.readouterr().err


def test_a_bad_lock_timeout_is_one_line(tmp_path, monkeypatch, run_cli):
    from t2f.errors import UsageError
    from t2f.private import directory_lock

    monkeypatch.setenv("T2F_LOCK_TIMEOUT", "nan")
    with pytest.raises(UsageError, match="^T2F_LOCK_TIMEOUT must be a number of seconds, got 'nan'$"):
        with directory_lock(tmp_path, "test", wait=True):
            pass
    monkeypatch.setenv("T2F_CACHE", str(tmp_path / "cache"))          # the on-demand export's wait: one line, no traceback
    result = run_cli(infer_main, [*TINY, "a face", "--backend", "onnxruntime", "--out", "face.png"], tmp_path)
    assert_one_error_line(result, 1, "T2F_LOCK_TIMEOUT must be a number of seconds, got 'nan'")


def test_a_lock_held_through_an_exited_process_names_no_pid(tmp_path):
    """The process that took the lock has exited but the open file lives on (in this test's own descriptor): the kernel
    still reports that dead pid as the holder, which t2f never presents as one."""
    from t2f.private import DirectoryInUse, directory_lock

    fd = _open_lock(tmp_path)
    with _holding(fd) as holder:
        pass                                          # the lock stays with the open file, which this test keeps open
    try:
        with pytest.raises(DirectoryInUse) as refused, directory_lock(tmp_path, "t2f-export"):
            pass
        assert str(refused.value) == f"{tmp_path} is in use by another t2f-export: unknown; wait for it to finish or stop it"
        assert str(holder.pid) not in str(refused.value)
    finally:
        os.close(fd)


@as_root
def test_a_lock_held_by_another_user_is_named_so_and_lock_files_are_0600(tmp_path):
    """An earlier t2f made its lock files 0644: another user could open one read-only and hold its lock. t2f makes its
    lock files 0600 (so nobody else can open them from then on) and names such a holder without a dead pid."""
    from t2f.private import DirectoryInUse, directory_lock

    fd = _open_lock(tmp_path, 0o644)
    os.fchmod(fd, 0o644)
    os.pwrite(fd, b"pid 999999 on here (t2f-export)\n", 0)
    with _holding(fd, user=OTHER) as holder:
        with pytest.raises(DirectoryInUse) as refused, directory_lock(tmp_path, "t2f-export"):
            pass
    os.close(fd)
    assert str(refused.value) == (f"{tmp_path} is in use by another t2f-export: a process of another user (uid 65534 (nobody), "
                                  f"pid {holder.pid}); wait for it to finish or stop it")
    assert _mode(tmp_path / ".t2f.lock") == 0o600
    with directory_lock(tmp_path, "t2f-export"):                     # released with its holder
        assert (tmp_path / ".t2f.lock").read_text().startswith(f"pid {os.getpid()} on ")
    os.unlink(tmp_path / ".t2f.lock")
    with directory_lock(tmp_path, "t2f-export"):
        assert _mode(tmp_path / ".t2f.lock") == 0o600                # a new one is made 0600, whatever the umask


@as_root
def test_a_lock_file_of_another_user_is_refused(tmp_path, run_cli):
    out = tmp_path / "export"
    out.mkdir()
    (out / ".t2f.lock").write_text("")
    os.chown(out / ".t2f.lock", OTHER, OTHER)
    result = run_cli(export_main, [*TINY, "--out", out, "--onnx-only"], tmp_path)
    assert_one_error_line(result, 1, f"{out / '.t2f.lock'} is owned by uid 65534 (nobody), not by you", "remove it")
    assert os.listdir(out) == [".t2f.lock"]


# ----------------------------------------------------------------------------
# What a killed on-demand export leaves in the cache is removed by the next run.


def test_the_next_run_removes_what_a_killed_export_left_in_the_cache(tmp_path, monkeypatch, models):
    import t2f.engine.backends.ondemand as ondemand
    import t2f.export.onnx_export as onnx_export
    from t2f.engine.backends.ondemand import ensure_onnx, onnx_cache_dir
    from t2f.precision import Precision

    out = onnx_cache_dir(models)
    out.mkdir(parents=True)
    (out / ".synthesis.onnx.k1ll3d.tmp").write_bytes(b"half a graph")
    (out / ".parity-k1ll3d").mkdir()
    (out / ".parity-k1ll3d" / "text_encoder.onnx").write_bytes(b"half")
    seen = []
    monkeypatch.setattr(onnx_export, "export_artifacts", lambda out, *a, **k: seen.append(sorted(os.listdir(out))))
    assert ensure_onnx(models, Precision.FP32) == out
    assert seen == [[".t2f.lock"]]                                   # removed before the export, under its lock
    # Graphs already current (a killed export of another precision left its temporary): removed, nothing exported.
    (out / ".manifest.json.k1ll3d.tmp").write_bytes(b"{")
    monkeypatch.setattr(ondemand, "artifacts_current", lambda *_: True)
    assert ensure_onnx(models, Precision.FP32) == out
    assert sorted(os.listdir(out)) == [".t2f.lock"] and len(seen) == 1


# ----------------------------------------------------------------------------
# Atomic writes give files the mode open() would, without reading the umask (setting it, for every thread, to read it).


def test_atomic_writes_keep_the_umask_modes_without_touching_the_umask(tmp_path, monkeypatch):
    from t2f.files import atomic_dir, atomic_path, write_json

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("t2f read the umask"))
        write_json(tmp_path / "a.json", {"a": 1})
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "x").write_text("x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"b")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (_mode(tmp_path / "a.json"), _mode(tmp_path / "b.bin"), _mode(tmp_path / "model")) == (0o640, 0o640, 0o750)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin", "model"]
