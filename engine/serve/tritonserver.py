"""tritonserver as a child process of t2f-serve: its binaries, a private workspace, its shared memory, start, readiness, stop.

Triton runs a static model repository (repository.py) with `--model-control-mode none`: no
load / unload API, no access token, no PyTriton. Its gRPC listens on a Unix socket in the private
workspace (WORKSPACE/grpc:0; no other user can connect, so none can call its system-shared-memory
API), or on a TCP address where asked; it serves metrics on 127.0.0.1; its HTTP front end is off,
t2f's own front (web.py) takes HTTP. Nothing on its command line is a secret. Its temporary
files go to WORKSPACE/tmp; the Python backend's empty /tmp/python_env_* (a fixed path) is removed
by t2f-serve, after a crash too.

Workspaces live in CACHE/serve/PID-TOKEN (0700) and hold a lock that the live server keeps: a
start removes the workspaces, shared-memory regions and python_env directories of servers that
died (kill -9 included); triton_files.py has what lies outside the workspace.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time

from t2f.files import read_json, write_json

from .addresses import bind_port
from .triton_files import TritonError, new_python_envs, remove_python_envs, remove_shared_memory, tighten_shared_memory

MAX_SOCKET_PATH = 107                        # sockaddr_un's sun_path, less its NUL


# ----------------------------------------------------------------------------
# Binaries.


@dataclasses.dataclass(frozen=True)
class Binaries:
    tritonserver: str                   # the executable
    backend_directory: str              # holds python/ (libtriton_python.so, triton_python_backend_utils.py, the stub)
    library_path: tuple[str, ...]       # prepended to LD_LIBRARY_PATH


def python_libdir() -> list[str]:
    """This interpreter's lib directory where it holds libpython (the stub links it by name; pyenv / conda builds)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    has_lib = os.path.isdir(libdir) and any(name.startswith(f"libpython{version}") and ".so" in name for name in os.listdir(libdir))
    return [libdir] if has_lib else []


def embedded_binaries(workspace: str) -> Binaries:
    """The tritonserver and Python backend bundled in the nvidia-pytriton wheel, with the stub for this interpreter."""
    try:
        import pytriton
    except ImportError:
        raise TritonError('t2f-serve needs the tritonserver of nvidia-pytriton (pip install "t2f[serve]") or --tritonserver PATH') from None
    root = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(root, "python_backend_stubs", version, "triton_python_backend_stub")
    if not os.path.isfile(stub):
        raise TritonError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backends = os.path.join(workspace, "backends")
    os.makedirs(os.path.join(backends, "python"), mode=0o700)
    for source in (os.path.join(root, "backends", "python", "libtriton_python.so"),
                   os.path.join(root, "backends", "python", "triton_python_backend_utils.py"), stub):
        os.symlink(source, os.path.join(backends, "python", os.path.basename(source)))
    libs = os.path.join(os.path.dirname(os.path.dirname(pytriton.__file__)), "nvidia_pytriton.libs")
    return Binaries(os.path.join(root, "bin", "tritonserver"), backends, tuple(python_libdir() + ([libs] if os.path.isdir(libs) else [])))


def user_binaries(tritonserver: str) -> Binaries:
    """A user's own tritonserver (ROOT/bin/tritonserver) with its own ROOT/backends (NVIDIA's layout)."""
    path = shutil.which(tritonserver) or tritonserver
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise TritonError(f"--tritonserver {tritonserver}: not an executable file")
    backends = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(path))), "backends")
    if not os.path.isfile(os.path.join(backends, "python", "libtriton_python.so")):
        raise TritonError(f"--tritonserver {tritonserver}: no Python backend in {backends}/python")
    return Binaries(path, backends, tuple(python_libdir()))


# ----------------------------------------------------------------------------
# Workspaces.


SERVE_FIX = "use --cache DIR or set T2F_CACHE to a directory of your own"


def workspace_parent(cache: str | None = None) -> str:
    """CACHE/serve (CACHE: --cache, else $T2F_CACHE or ~/.cache/t2f), created 0700; UnsafePathError (one line) where
    another user could change it, who could then swap a workspace and have Triton load their model.py."""
    from t2f.download import cache_dir
    from t2f.private import private_dir

    return str(private_dir(cache or cache_dir(), "serve", fix=SERVE_FIX))


class Workspace:
    """A fresh private directory CACHE/serve/PID-TOKEN, locked while this server lives.

    `parent` is checked first (t2f.private.private_dir: created 0700, the user's alone), so no other
    user can rename or replace the workspace, made 0700 inside it, or anything in it.
    """

    def __init__(self, parent: str):
        from t2f.private import private_dir

        private_dir(parent, fix=SERVE_FIX)
        token = secrets.token_hex(4)
        self.path = os.path.join(os.path.realpath(parent), f"{os.getpid()}-{token}")
        self.shm_prefix = f"t2f{token}{os.getpid()}_"          # the Python backend's region names start with it
        self.server_id = f"t2f-serve-{token}"                  # Triton's --id: the front checks it talks to its own Triton
        os.mkdir(self.path, 0o700)
        self._lock = open(os.path.join(self.path, "lock"), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        write_json(os.path.join(self.path, "workspace.json"), dict(pid=os.getpid(), shm_prefix=self.shm_prefix))
        self.repository = os.path.join(self.path, "repository")
        self.grpc_socket = os.path.join(self.path, "grpc")      # Triton's gRPC: the socket file is grpc:0 (it adds the port)
        self.tmp = os.path.join(self.path, "tmp")              # TMPDIR of Triton and its stubs
        os.mkdir(self.tmp, 0o700)

    def remove(self) -> None:
        remove_shared_memory(self.shm_prefix)
        remove_python_envs(self.path)
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def processes_naming(text: str) -> list[int]:
    """This user's processes whose command line holds `text` (Triton and its stubs name their workspace's repository)."""
    found, marker = [], text.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker in f.read():
                        found.append(int(entry))
    return found


def clean_stale_workspaces(parent: str) -> list[str]:
    """Remove the workspaces (and shared memory) under `parent` whose server is gone (its lock is free); their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            try:
                lock = open(os.path.join(path, "lock"), "a")
            except OSError:
                lock = None
            try:
                if lock is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue                                       # a live server's
            try:
                for pid in processes_naming(path):           # a Triton or stub that outlived its t2f-serve (kill -9)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                remove_python_envs(path)
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    prefix = str(read_json(os.path.join(path, "workspace.json"))["shm_prefix"])
                    if prefix.startswith("t2f"):
                        remove_shared_memory(prefix)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            finally:
                if lock is not None:
                    lock.close()
    return removed


# ----------------------------------------------------------------------------
# The process.


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when t2f-serve dies (kill -9 included), and files private to this user."""
    os.umask(0o077)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG


BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)     # Triton logs it at every start on a machine without CUDA


def log_errors(path: str, lines: int = 3, offset: int = 0) -> str:
    """Triton's error lines after byte `offset`, each cut at its first embedded newline (a Python traceback), joined by " | "."""
    found = []
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        for line in f:
            if any(benign in line for benign in BENIGN_ERRORS):
                continue
            if line.startswith("E") or line.startswith("error:"):
                text = line.split("] ", 1)[-1].strip().strip('"').split("\\n")[0].strip()
                if text and text not in found:
                    found.append(text)
    return " | ".join(found[-lines:])


class Triton:
    """One tritonserver process on `repository`; start() waits until both models are ready."""

    def __init__(self,
        binaries: Binaries,
        workspace: Workspace,
        grpc_host: str | None = None,       # TCP address of Triton's gRPC (KServe v2); None = a Unix socket in the workspace.
        grpc_port: int = 8001,              # With grpc_host.
        metrics_port: int = 8002,           # Prometheus metrics, on 127.0.0.1 (the front passes GET /metrics on).
        verbose: bool = False,              # Triton's log on the console (else WORKSPACE/triton.log).
        exit_timeout_s: int = 5,            # On stop: how long Triton waits for requests in flight.
        models: tuple[str, ...] = ("t2f", "t2f_image"),
    ):
        self.binaries, self.workspace = binaries, workspace
        self.grpc_host, self.grpc_port, self.metrics_port = grpc_host, grpc_port, metrics_port
        self.verbose, self.exit_timeout_s, self.models = verbose, exit_timeout_s, models
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(workspace.path, "triton.log")
        self.starts = 0
        self.log_offset = 0                 # where this start's lines begin in the log
        self.python_envs_before: set[str] = set()

    @property
    def grpc_url(self) -> str:
        """Where gRPC clients (the front) reach this Triton: unix:PATH, or HOST:PORT."""
        if self.grpc_host is None:
            return f"unix:{self.workspace.grpc_socket}:0"
        host = "127.0.0.1" if self.grpc_host in ("0.0.0.0", "") else ("[::1]" if self.grpc_host == "::" else self.grpc_host)
        return f"{host}:{self.grpc_port}"

    def grpc_arguments(self) -> list[str]:
        if self.grpc_host is None:
            return ["--grpc-address", f"unix:{self.workspace.grpc_socket}", "--grpc-port", "0"]
        return ["--grpc-address", self.grpc_host, "--grpc-port", str(self.grpc_port)]

    def command(self) -> list[str]:
        return [self.binaries.tritonserver, "--model-repository", self.workspace.repository, "--model-control-mode", "none",
                "--backend-directory", self.binaries.backend_directory, "--id", self.workspace.server_id,
                "--allow-http", "false", "--allow-sagemaker", "false", "--allow-vertex-ai", "false",
                *self.grpc_arguments(),
                "--allow-metrics", "true", "--allow-gpu-metrics", "false", "--allow-cpu-metrics", "false",
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--backend-config", f"python,shm-region-prefix-name={self.workspace.shm_prefix}",
                "--exit-timeout-secs", str(self.exit_timeout_s), "--log-verbose", "1" if self.verbose else "0",
                "--strict-readiness", "true", "--exit-on-error", "true"]

    def environment(self) -> dict:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join([*self.binaries.library_path, *filter(None, [env.get("LD_LIBRARY_PATH")])])
        # The stub finds its interpreter on PATH: this one, so a virtual environment's packages are the ones the models import.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        for name in ("TMPDIR", "TMP", "TEMP"):                     # temporary files go with the workspace, after a crash too
            env[name] = self.workspace.tmp
        return env

    def start(self, timeout_s: float = 600, cancel: threading.Event | None = None) -> None:
        """Start Triton and wait until it and both models are ready; TritonError (one line) where it does not."""
        if self.grpc_host is None and len(os.fsencode(self.workspace.grpc_socket + ":0")) > MAX_SOCKET_PATH:
            raise TritonError(f"the workspace {self.workspace.path} is too long a path for Triton's gRPC socket (at most "
                              f"{MAX_SOCKET_PATH - len('/grpc:0')} bytes): give a shorter --cache")
        ports = [(self.grpc_host, self.grpc_port, "--grpc-port")] if self.grpc_host is not None else []
        try:
            for host, port, option in [*ports, ("127.0.0.1", self.metrics_port, "--metrics-port")]:
                bind_port(host, port, option).close()            # free now; Triton binds it next
        except OSError as e:
            raise TritonError(str(e)) from None
        remove_shared_memory(self.workspace.shm_prefix)          # a previous run's, after a crash
        with contextlib.suppress(OSError):
            self.log_offset = os.path.getsize(self.log_path)
        log = None if self.verbose else open(self.log_path, "ab")
        self.python_envs_before = set(new_python_envs(set()))
        try:
            self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT if log else None,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, start_new_session=True)
        except OSError as e:
            raise TritonError(f"could not run {self.binaries.tritonserver}: {e.strerror}") from None
        finally:
            if log is not None:
                log.close()
        self.starts += 1
        stop = threading.Event()
        watcher = threading.Thread(target=self._tighten_while, args=(stop,), daemon=True)
        watcher.start()
        try:
            self._wait_ready(timeout_s, cancel)
        except BaseException:
            self.stop()
            raise
        finally:
            stop.set()
            watcher.join()
        tighten_shared_memory(self.workspace.shm_prefix)

    def _tighten_while(self, stop: threading.Event) -> None:
        ticks = 0
        while not stop.wait(0.005):                    # shared memory every 5 ms: the window another user could use
            with contextlib.suppress(TritonError):
                tighten_shared_memory(self.workspace.shm_prefix)
            ticks += 1
            if ticks % 100 == 0:                       # /tmp's listing every 0.5 s: for a start killed with -9
                self.record_python_envs()
        self.record_python_envs()

    def record_python_envs(self) -> None:
        """Note in the workspace the /tmp/python_env_* this start made (another of this user's Tritons starting in the same
        moment may have made one of them: its empty directory would go too), so that they go with the workspace."""
        found = new_python_envs(self.python_envs_before)
        if found:
            self.python_envs_before.update(found)
            with open(os.path.join(self.workspace.path, "python_envs"), "a") as f:
                f.write("".join(path + "\n" for path in found))

    def _wait_ready(self, timeout_s: float, cancel: threading.Event | None) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            while True:
                if self.process.poll() is not None:
                    raise TritonError(f"Triton Inference Server {self.exit_reason()}")
                name = None
                with contextlib.suppress(Exception):
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in self.models):
                        name = client.get_server_metadata().name
                if name is not None:
                    if name != self.workspace.server_id:
                        raise TritonError(f"{self.grpc_url} answers another Triton ({name}), not this server's")
                    return
                if cancel is not None and cancel.is_set():
                    raise TritonError("stopped while starting")
                if time.monotonic() > deadline:
                    raise TritonError(f"Triton Inference Server was not ready after {timeout_s:.0f} s" + self._log_suffix())
                time.sleep(0.1)

    def _log_suffix(self) -> str:
        errors = log_errors(self.log_path, offset=self.log_offset)
        return f": {errors}" if errors else (" (run with --verbose for its log)" if not self.verbose else "")

    def exit_reason(self) -> str:
        code = self.process.returncode if self.process is not None else None
        if code is None:
            return "is running"
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return how + self._log_suffix()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop Triton (SIGTERM, then SIGKILL), its stubs, and remove its shared memory."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._stop_stubs()
        remove_shared_memory(self.workspace.shm_prefix)
        remove_python_envs(self.workspace.path)

    def _stop_stubs(self, timeout_s: float = 15) -> None:
        """The Python backend stubs name this server's region on their command line; end any that outlive Triton."""
        deadline = time.monotonic() + timeout_s
        while self.stub_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.stub_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def stub_pids(self) -> list[int]:
        return processes_naming(self.workspace.shm_prefix)
