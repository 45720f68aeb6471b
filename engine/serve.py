"""`t2f-serve`: the pipeline on NVIDIA Triton Inference Server (through PyTriton), and a page where faces follow typing.

Triton gives the KServe v2 protocol over HTTP and gRPC, dynamic batching, health endpoints and
Prometheus metrics; the models' Python code runs in this process, fed by PyTriton's proxy.

    t2f         prompt BYTES [1], seed INT64 [1], truncation FP32 [1],
                sample INT64 [1] (optional, 0), noise_mode BYTES [1] (optional, "const")
                -> image UINT8 [H, W, 3], ws FP32 [num_ws, w_dim]
    t2f_image   image UINT8 [h, w, 3] (a face, any size) in place of prompt; the rest as t2f

Every input has one value per row and a request carries up to the max batch of rows. Row r is
image `sample` of `t2f-infer PROMPT --n sample+1 --seed SEED --truncation PSI` (t2f_image:
`t2f-infer --mode image --image FACE ...`) at the same --batch, bit for bit, whichever requests the
batcher merged it with (the graphs run on fixed blocks of --batch rows: see pipeline.blocks).

Each request is checked on its own. A bad one is answered with an error that names its problem,
and the requests merged with it are answered as if it had not been sent: the callable returns
{ERROR_KEY: message} in its place and the proxy model that Triton runs turns that into the
request's own error response (PyTriton 0.7 answers a batch as a whole; see proxy_model_files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import secrets
import signal
import sys
import sysconfig
import tempfile
import threading

import click
import numpy as np

from t2f.precision import PRECISIONS, Precision
from t2f.stylegan2 import NOISE_MODES

from .backends import BACKENDS, BackendUnavailable

TEXT_MODEL = "t2f"
IMAGE_MODEL = "t2f_image"
MAX_PROMPT_BYTES = 1024        # Longer prompts are refused before tokenizing (CLIP takes 77 tokens anyway).
MAX_SAMPLE = 63                # t2f-infer's --n goes up to 64.
MAX_SEED = 2**63 - 1
TRUNCATION_RANGE = (-1.0, 2.0)  # t2f-infer's --truncation range.
MAX_FACE_SIDE = 4096           # t2f_image: largest side of an input face.
MAX_WORKSPACE_PATH = 78        # A Unix socket path holds 107 bytes; PyTriton adds up to "/t2f_image_0_99-server.sock".
ERROR_KEY = "t2f_error"        # A response dict holding only this (bytes [1]) refuses its request with that message.
HANDSHAKE_TIMEOUT_S = 60       # How long a model instance waits for the first instance's handshake server while loading.


class BadRequest(ValueError):
    """A request the models refuse; its message names the problem."""


# ----------------------------------------------------------------------------
# Requests -> rows -> the pipeline.


@dataclasses.dataclass
class Rows:
    """One request's rows, checked."""
    seeds: list[int]
    samples: list[int]
    truncations: list[float]
    noise_mode: str
    prompts: list[str] | None = None            # t2f
    faces: list[np.ndarray] | None = None       # t2f_image: uint8 [h, w, 3] each


def _column(data: dict, name: str, dtype, rows: int | None, optional: bool = False):
    """Input `name` as a 1-d array of `rows` values (Triton has checked dtype and shape [rows, 1])."""
    if name not in data:
        if optional:
            return None
        raise BadRequest(f"input {name} is missing")
    array = np.asarray(data[name])
    if array.dtype != dtype and not (dtype is object and array.dtype.kind in "OSU"):
        raise BadRequest(f"input {name} must be {np.dtype(dtype).name}, got {array.dtype.name}")
    array = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    if array.shape[1] != 1 or (rows is not None and array.shape[0] != rows):
        raise BadRequest(f"input {name} must have shape [{rows if rows is not None else 'rows'}, 1], got {list(np.asarray(data[name]).shape)}")
    return array[:, 0]


def _text(value, name: str) -> str:
    try:
        return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8 text") from None


def parse_request(data: dict, pipe, image_mode: bool) -> Rows:
    """A request's inputs (numpy arrays, one row each) -> Rows for `pipe`; BadRequest naming the first problem."""
    first = "image" if image_mode else "prompt"
    if first not in data:
        raise BadRequest(f"input {first} is missing")
    rows = np.asarray(data[first]).shape[0] if np.asarray(data[first]).ndim else 1
    if rows < 1:
        raise BadRequest("a request needs at least one row")
    seeds = _column(data, "seed", np.int64, rows)
    truncations = _column(data, "truncation", np.float32, rows)
    samples = _column(data, "sample", np.int64, rows, optional=True)
    modes = _column(data, "noise_mode", object, rows, optional=True)
    for r in range(rows):
        if not 0 <= int(seeds[r]) <= MAX_SEED:
            raise BadRequest(f"seed must be in 0..{MAX_SEED}, got {int(seeds[r])} (row {r})")
        psi = float(truncations[r])
        if not math.isfinite(psi) or not TRUNCATION_RANGE[0] <= psi <= TRUNCATION_RANGE[1]:
            raise BadRequest(f"truncation must be a finite number in [{TRUNCATION_RANGE[0]:g}, {TRUNCATION_RANGE[1]:g}], got {psi} (row {r})")
        if samples is not None and not 0 <= int(samples[r]) <= MAX_SAMPLE:
            raise BadRequest(f"sample must be in 0..{MAX_SAMPLE}, got {int(samples[r])} (row {r})")
    noise = sorted({_text(m, "noise_mode") for m in modes}) if modes is not None else ["const"]
    if len(noise) != 1 or noise[0] not in NOISE_MODES:
        raise BadRequest(f"noise_mode must be one of {', '.join(NOISE_MODES)} (one per request), got {', '.join(noise)}")
    if noise[0] not in pipe.backend.noise_modes:
        raise BadRequest(f"noise_mode {noise[0]} needs t2f-serve --backend torch (exported graphs hold constant noise)")
    out = Rows(seeds=[int(s) for s in seeds], samples=[int(s) for s in samples] if samples is not None else [0] * rows,
               truncations=[float(t) for t in truncations], noise_mode=noise[0])
    if image_mode:
        faces = np.asarray(data["image"])
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[-1] != 3:
            raise BadRequest(f"input image must be uint8 [rows, height, width, 3], got {faces.dtype.name} {list(faces.shape)}")
        if not (1 <= min(faces.shape[1:3]) and max(faces.shape[1:3]) <= MAX_FACE_SIDE):
            raise BadRequest(f"image sides must be 1..{MAX_FACE_SIDE}, got {faces.shape[1]} x {faces.shape[2]}")
        out.faces = list(faces)
        return out
    from .pipeline import is_blank

    prompts = [_text(p, "prompt") for p in _column(data, "prompt", object, rows)]
    for r, prompt in enumerate(prompts):
        if is_blank(prompt):
            raise BadRequest(f"prompt is empty (row {r})")
        size = len(prompt.encode("utf-8"))
        tokens = pipe.clip.token_count(prompt) if size <= MAX_PROMPT_BYTES else None
        if size > MAX_PROMPT_BYTES or (tokens is not None and tokens > pipe.clip.context_length):
            length = f"{tokens} tokens" if tokens is not None else f"{size} bytes"
            raise BadRequest(f"prompt is too long: {length}, CLIP takes {pipe.clip.context_length} tokens (row {r})")
    out.prompts = prompts
    return out


def refusal(message: str) -> dict:
    """The response that refuses one request with `message` (see proxy_model_files)."""
    return {ERROR_KEY: np.array([message.encode("utf-8")], dtype=np.bytes_)}


@dataclasses.dataclass
class Served:
    """What one model instance (one pipeline) has answered; updated under the pipeline's lock."""
    device: str
    calls: int = 0                # pipeline calls (one per noise mode in a batch)
    requests: int = 0             # requests answered with faces
    rows: int = 0
    refused: int = 0              # requests answered with an error


class ModelCallable:
    """PyTriton's inference callable for one model on one pipeline: a batch of requests -> one response each.

    Requests merged into one batch run as one pipeline call per noise mode. Each request is checked
    on its own: a bad one gets refusal(its problem) and the others run without it.
    """

    def __init__(self, pipe, lock: threading.Lock, image_mode: bool, served: Served | None = None):
        self.pipe, self.lock, self.image_mode = pipe, lock, image_mode
        self.served = served if served is not None else Served(str(pipe.device))

    def __call__(self, requests) -> list[dict]:
        outputs: list[dict] = [dict() for _ in requests]
        parsed = []
        for k, request in enumerate(requests):
            try:
                parsed.append((k, parse_request(request.data, self.pipe, self.image_mode)))
            except BadRequest as e:
                outputs[k] = refusal(f"bad request: {e}")
        with self.lock:
            self.served.refused += len(requests) - len(parsed)
        for noise_mode in sorted({rows.noise_mode for _, rows in parsed}):
            group = [(k, rows) for k, rows in parsed if rows.noise_mode == noise_mode]
            flat = {key: [v for _, rows in group for v in getattr(rows, key)] for key in ("seeds", "samples", "truncations")}
            with self.lock:
                if self.image_mode:
                    import torch

                    from .pipeline import face_tensor

                    faces = torch.stack([face_tensor(face) for _, rows in group for face in rows.faces])
                    result = self.pipe.generate_requests(**flat, images=faces, noise_mode=noise_mode)
                else:
                    prompts = [p for _, rows in group for p in rows.prompts]
                    result = self.pipe.generate_requests(**flat, prompts=prompts, noise_mode=noise_mode)
                self.served.calls += 1
                self.served.requests += len(group)
                self.served.rows += len(flat["seeds"])
            images, ws = result.images.numpy(), result.ws.numpy()
            start = 0
            for k, rows in group:
                end = start + len(rows.seeds)
                outputs[k] = dict(image=images[start:end], ws=ws[start:end])
                start = end
        return outputs


# ----------------------------------------------------------------------------
# The proxy model Triton runs: PyTriton's, with a per-request error.


PROXY_SHIM = f'''

# ---- Appended by t2f-serve (t2f.engine.serve.proxy_model_files) to PyTriton's proxy model. ----
import time as _t2f_time

# A response holding {ERROR_KEY!r} becomes that request's own error response; the other requests of
# the batch are answered by PyTriton's _wrap_response as before. BatchResponsesHandler looks the
# name _wrap_response up when it answers, so this definition is the one it calls.
_t2f_pytriton_wrap_response = _wrap_response


def _wrap_response(response, requested_outputs_names, model_outputs_dict):
    if response.data is not None and {ERROR_KEY!r} in response.data:
        message = bytes(response.data[{ERROR_KEY!r}].reshape(-1)[0]).decode("utf-8", "replace")
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)          # HTTP 400 / gRPC INVALID_ARGUMENT
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        return pb_utils.InferenceResponse(error=error)
    return _t2f_pytriton_wrap_response(response, requested_outputs_names, model_outputs_dict)


# Instance 0 of a model serves the handshake that the other instances (loaded at the same time) read.
# Its socket file appears at bind(), before listen(), and PyTriton gives up at the first refused
# connection or after 1 s: with several instances a model then failed to load now and then.
_t2f_pytriton_get_config = get_config_from_handshake_server


def get_config_from_handshake_server(socket_path, timeout_s=1.0):
    deadline = _t2f_time.monotonic() + {HANDSHAKE_TIMEOUT_S}
    while True:
        try:
            return _t2f_pytriton_get_config(socket_path, timeout_s)
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            if _t2f_time.monotonic() > deadline:
                raise
            _t2f_time.sleep(0.05)
'''
PROXY_NAMES = (b"\ndef _wrap_response(response", b"get_config_from_handshake_server(handshake_socket)")   # what PROXY_SHIM redefines


def proxy_model_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """PyTriton's proxy model files (Model.get_proxy_model_files) with PROXY_SHIM appended to model.py.

    RuntimeError, before Triton loads anything, where that model.py has no module-level
    _wrap_response or get_config_from_handshake_server to redefine (a PyTriton other than the 0.7
    series that setup.py pins).
    """
    names = [name for name in files if name.rsplit("/", 1)[-1] == "model.py"]
    if len(names) != 1 or not all(name in files[names[0]] for name in PROXY_NAMES):
        from importlib.metadata import version

        raise RuntimeError(f"nvidia-pytriton {version('nvidia-pytriton')}'s proxy model has no _wrap_response(response, ...) or "
                           "get_config_from_handshake_server, which t2f-serve redefines (t2f.engine.serve.PROXY_SHIM); "
                           "install nvidia-pytriton>=0.7,<0.8")
    return {**files, names[0]: files[names[0]] + PROXY_SHIM.encode("utf-8")}


def refuse_requests_alone(triton, model_names: tuple[str, ...]) -> None:
    """Make the bound models `model_names` load with proxy_model_files (checked now, so a mismatch fails at startup)."""
    models = [m for m in getattr(getattr(triton, "_model_manager", None), "models", ()) if m.model_name in model_names]
    if len(models) != len(model_names) or not all(hasattr(m, "get_proxy_model_files") for m in models):
        raise RuntimeError("this nvidia-pytriton binds models in a way t2f-serve does not know; install nvidia-pytriton>=0.7,<0.8")
    for model in models:
        pytriton_files = model.get_proxy_model_files
        proxy_model_files(pytriton_files())
        model.get_proxy_model_files = lambda files=pytriton_files: proxy_model_files(files())


# ----------------------------------------------------------------------------
# The server.


@contextlib.contextmanager
def python_library_path():
    """Put this interpreter's own lib directory first on LD_LIBRARY_PATH while Triton starts.

    Triton's Python backend stub links libpython by name; where this interpreter was built apart
    from the system's (pyenv, conda), the system's libpython would be loaded beside it and every
    model fail to load. Triton's process inherits the variable; this process is unaffected.
    """
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    has_lib = os.path.isdir(libdir) and any(name.startswith(f"libpython{version}") and ".so" in name for name in os.listdir(libdir))
    saved = os.environ.get("LD_LIBRARY_PATH")
    if has_lib:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + ([saved] if saved else []))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = saved


@dataclasses.dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"        # Address Triton binds (PyTriton's own default is all interfaces).
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    @property
    def local(self) -> str:
        """The address a client on this machine uses."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)

    @property
    def http_url(self) -> str:
        return f"{self.local}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.local}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.local}:{self.metrics_port}/metrics"


class Server:
    """Triton with the t2f models bound to one or more pipelines (one model instance each), as a context manager.

    The workspace (model store, sockets, Triton's binaries) is a fresh directory under the cache
    (under the system's temporary directory where the cache's path is too long for a Unix
    socket) and is removed on exit, with Triton, its stub processes and their shared memory.
    """

    def __init__(self,
        pipelines: list,                    # TextToFace objects; one model instance per pipeline (one per GPU).
        endpoints: Endpoints = Endpoints(),
        max_batch: int = 32,                # Dynamic batcher: most rows in one batch (the pipelines run them in blocks of their batch_size).
        queue_delay_us: int = 0,            # Dynamic batcher: how long a request may wait for others; 0 = batch what is queued.
        cache: str | None = None,           # Workspace parent; None = $T2F_CACHE or ~/.cache/t2f.
        verbose: bool = False,              # Triton's and PyTriton's logs on the console (else in the workspace's triton.log).
        exit_timeout_s: int = 5,            # On stop: how long Triton waits for in-flight requests and open connections.
    ):
        if not pipelines:
            raise ValueError("give at least one pipeline")
        self.pipelines, self.endpoints, self.max_batch, self.queue_delay_us = list(pipelines), endpoints, max_batch, queue_delay_us
        self.served = [Served(str(p.device)) for p in self.pipelines]
        self.cache, self.verbose, self.exit_timeout_s = cache, verbose, exit_timeout_s
        self.triton = None
        self.workspace = None

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
            from pytriton.triton import Triton, TritonConfig
        except ImportError:
            raise BackendUnavailable('t2f-serve needs nvidia-pytriton: pip install "t2f[serve]"') from None
        from t2f.download import cache_dir

        if not self.verbose:                # a refused request is the client's error, not the server's
            logging.getLogger("pytriton").setLevel(logging.ERROR)
        parent = os.path.join(self.cache or str(cache_dir()), "serve")
        os.makedirs(parent, exist_ok=True)
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        workspace = os.path.join(os.path.realpath(parent), name)
        if len(workspace) > MAX_WORKSPACE_PATH:     # PyTriton's Unix sockets live in the workspace
            workspace = os.path.join(tempfile.gettempdir(), f"t2f-serve-{name}")
        self.workspace = workspace
        e = self.endpoints
        config = TritonConfig(http_address=e.host, http_port=e.http_port, grpc_address=e.host, grpc_port=e.grpc_port,
                              metrics_address=e.host, metrics_port=e.metrics_port, allow_metrics=True, allow_gpu_metrics=False,
                              log_verbose=1 if self.verbose else 0, exit_on_error=True, exit_timeout_secs=self.exit_timeout_s,
                              log_file=None if self.verbose else os.path.join(workspace, "triton.log"))
        self.triton = Triton(config=config, workspace=workspace)
        pipe = self.pipelines[0]
        res = pipe.generator.resolution
        channels = pipe.generator.config.img_channels
        num_ws, w_dim = pipe.generator.num_ws, pipe.generator.w_dim
        common = [Tensor(name="seed", dtype=np.int64, shape=(1,)), Tensor(name="truncation", dtype=np.float32, shape=(1,)),
                  Tensor(name="sample", dtype=np.int64, shape=(1,), optional=True),
                  Tensor(name="noise_mode", dtype=bytes, shape=(1,), optional=True)]
        outputs = [Tensor(name="image", dtype=np.uint8, shape=(res, res, channels)), Tensor(name="ws", dtype=np.float32, shape=(num_ws, w_dim))]
        model_config = ModelConfig(max_batch_size=self.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=self.queue_delay_us))
        locks = [threading.Lock() for _ in self.pipelines]          # the two models share each pipeline
        instances = list(zip(self.pipelines, locks, self.served))
        try:
            with python_library_path():
                # strict=False: PyTriton's strict check refuses any output not in the config, and a refusal holds ERROR_KEY only.
                self.triton.bind(model_name=TEXT_MODEL, infer_func=[ModelCallable(p, lock, False, served) for p, lock, served in instances],
                                 inputs=[Tensor(name="prompt", dtype=bytes, shape=(1,))] + common, outputs=outputs, config=model_config, strict=False)
                self.triton.bind(model_name=IMAGE_MODEL, infer_func=[ModelCallable(p, lock, True, served) for p, lock, served in instances],
                                 inputs=[Tensor(name="image", dtype=np.uint8, shape=(-1, -1, 3))] + common, outputs=outputs, config=model_config, strict=False)
                refuse_requests_alone(self.triton, (TEXT_MODEL, IMAGE_MODEL))
                self.triton.run()
        except BaseException as e:
            log = self._log_errors(os.path.join(workspace, "triton.log"))
            self.stop()
            if log and isinstance(e, Exception):
                raise RuntimeError(f"{e}; Triton's log says: {log}") from None
            raise

    @staticmethod
    def _log_errors(path: str, lines: int = 5) -> str:
        """The last error lines of Triton's log, where there is one."""
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join([line.strip() for line in f if line.startswith("E")][-lines:])
        return ""

    def summary(self) -> str:
        """What each model instance answered, one clause each."""
        return "; ".join(f"instance {i} ({s.device}): {s.requests} request(s), {s.rows} row(s) in {s.calls} pipeline call(s), "
                         f"{s.refused} refused" for i, s in enumerate(self.served))

    def serve_forever(self, stop: threading.Event) -> None:
        """Block until `stop` is set or Triton exits."""
        while not stop.wait(1.0):
            if not self.triton.is_alive():
                raise click.ClickException("Triton Inference Server stopped")

    def stop(self) -> None:
        if self.triton is not None:
            triton, self.triton = self.triton, None
            triton.stop()


# ----------------------------------------------------------------------------
# The command.


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--mapper",         help="Mapper directory (a t2f-train run), or tiny (random weights)", metavar="DIR|NAME")
@click.option("--generator",      help="Generator preset, directory, NVIDIA .pkl or rosinality .pt", metavar="NAME|PATH", default="ffhq-1024", show_default=True)
@click.option("--clip",           help="open_clip MODEL:TAG, MODEL:/path/to/checkpoint, or tiny", metavar="SPEC", default="ViT-B-32:openai", show_default=True)
@click.option("--backend",        help="How to run the graphs (auto = the fastest available)", type=click.Choice(("auto",) + BACKENDS), default="torch", show_default=True)
@click.option("--artifacts",      help="t2f-export output for onnxruntime / tensorrt", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--precision",      help="Compute precision (fp16 needs CUDA)", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--device",         help="auto, cpu, cuda or cuda:N; repeat for one model instance per device (twice: two on it)", metavar="STR", multiple=True, default=["auto"], show_default=True)
@click.option("--batch",          help="Rows per graph call, as t2f-infer --batch (the same gives the same images bit for bit) [default: 1 on the CPU, 8 on a GPU]", metavar="INT", type=click.IntRange(1, 256))
@click.option("--max-batch",      help="Largest batch the batcher forms (run in blocks of --batch rows)", metavar="INT", type=click.IntRange(1, 256), default=32, show_default=True)
@click.option("--queue-delay-us", help="How long a request may wait for others to batch with", metavar="INT", type=click.IntRange(0, 10_000_000), default=0, show_default=True)
@click.option("--host",           help="Address to bind (0.0.0.0 = every interface)", metavar="ADDR", default="127.0.0.1", show_default=True)
@click.option("--http-port",      help="Triton HTTP port (KServe v2)", metavar="INT", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port",      help="Triton gRPC port (KServe v2)", metavar="INT", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port",   help="Prometheus metrics port", metavar="INT", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--web",            help="Also serve the page where faces follow your typing", is_flag=True)
@click.option("--web-port",       help="Port of the page", metavar="INT", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--cache",          help="Download cache and workspace [default: $T2F_CACHE or ~/.cache/t2f]", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--verbose",        help="Triton's and PyTriton's logs", is_flag=True)
def main(mapper, generator, clip, backend, artifacts, precision, device, batch, max_batch, queue_delay_us, host, http_port, grpc_port,
         metrics_port, web, web_port, cache, verbose):
    """Serve text -> faces on Triton Inference Server (HTTP and gRPC, dynamic batching), and optionally a live page.

    \b
    Examples:
    # Offline smoke run on the CPU with random-weight tiny models, and the page on http://127.0.0.1:8080:
    t2f-serve --generator tiny --clip tiny --mapper tiny --web

    \b
    # A trained mapper, one model instance on each of two GPUs, reachable from other machines:
    t2f-serve --mapper runs/ffhq --device cuda:0 --device cuda:1 --precision fp16 --host 0.0.0.0
    """
    from t2f.cli_errors import user_errors
    from t2f.devices import resolve_device
    from t2f.download import cache_dir
    from t2f.graphs import ExportError

    from .pipeline import load_pipeline

    ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
    if web:
        ports["--web-port"] = web_port
    if len(set(ports.values())) != len(ports):
        raise click.BadParameter("every port must differ: " + ", ".join(f"{k} {v}" for k, v in ports.items()), param_hint="--http-port")
    try:
        resolved = [resolve_device(d) for d in device]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    precision = Precision.parse(precision)
    try:
        for d in resolved:
            precision.check_device(d)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--precision") from None
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise click.ClickException('t2f-serve needs nvidia-pytriton: pip install "t2f[serve]"') from None

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    with user_errors(OSError, BackendUnavailable, ExportError):
        pipes = [load_pipeline(generator=generator, clip=clip, mapper=mapper, device=str(d), precision=precision, batch_size=batch,
                               cache=cache, backend=backend, artifacts=artifacts) for d in device]   # "auto" keeps its CPU fallback
        for pipe in pipes:                                   # kernels, allocations, graph capture before the first client
            pipe.generate_requests([0], [0], [1.0], prompts=["a warm-up prompt"])
    if stop.is_set():
        return
    endpoints = Endpoints(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    page = None
    try:
        server = Server(pipes, endpoints, max_batch=max_batch, queue_delay_us=queue_delay_us, cache=cache, verbose=verbose)
        with server:
            if web:
                from .web import WebPage

                page = WebPage(endpoints, host=host, port=web_port, max_count=min(16, server.max_batch))
                try:
                    page.start()
                except RuntimeError as e:
                    raise click.ClickException(f"{e} (is the port in use? pass --web-port)") from None
            where = "every interface" if host in ("0.0.0.0", "::") else host
            click.echo(f"serving {TEXT_MODEL} and {IMAGE_MODEL} on {where}: HTTP {http_port}, gRPC {grpc_port}, "
                       f"metrics {endpoints.metrics_url}; max batch {server.max_batch} in blocks of {pipes[0].batch_size}, {len(pipes)} instance(s) "
                       f"({pipes[0].backend.name} on {', '.join(str(p.device) for p in pipes)}, {precision})", err=True)
            if page is not None:
                click.echo(f"page: http://{endpoints.local}:{web_port}/", err=True)
            if not server.workspace.startswith(os.path.realpath(cache or str(cache_dir()))):
                click.echo(f"note: the cache's path is too long for Triton's sockets; workspace in {server.workspace}", err=True)
            click.echo("ready; Ctrl-C to stop", err=True)
            server.serve_forever(stop)
    except RuntimeError as e:                                # PyTriton: the server did not start or a model did not load
        if not stop.is_set():                                # (Ctrl-C while starting also stops Triton: not an error)
            raise click.ClickException(f"Triton Inference Server: {' '.join(str(e).split())}") from None
    finally:
        if page is not None:
            page.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo(f"served: {server.summary()}", err=True)
    click.echo("stopped", err=True)


if __name__ == "__main__":
    main()
