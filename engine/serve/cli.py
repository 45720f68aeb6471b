"""`t2f-serve`: the pipeline on NVIDIA Triton Inference Server (a static model repository), behind a checking HTTP front.

Option mapping, usage checks, start, supervision and stop; the parts are the package's other modules
(the map and the data flow are in its __init__). The models, inputs and limits are protocol.py's.
t2f-serve writes the repository into a private workspace, starts tritonserver on it (the one bundled
in nvidia-pytriton, or --tritonserver) with its gRPC on a Unix socket in that workspace (TCP only
with --grpc-host), supervises it (one line and a restart within a budget per window when it dies,
supervise.py; readiness is false meanwhile), and removes the workspace, Triton's processes and
shared memory on exit; a start removes those of servers that died.
`--write-repository DIR` writes the same repository for NVIDIA's Triton container (docs/serving.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import urllib.request

import click

from t2f.errors import T2FError
from t2f.files import PathError, open_regular_file, printable

from ..config import PipelineConfig, pipeline_options
from .addresses import is_loopback
from .protocol import IMAGE_MODEL, TEXT_MODEL

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+-]{16,256}")
MAX_TOKEN_FILE_BYTES = 4096


def read_token(path: str) -> str:
    """The bearer token in `path` (16..256 URL-safe characters), refused where other users can read the file, or where it is
    not a small regular file (a FIFO would wait forever, /dev/zero never end)."""
    try:
        with open_regular_file(path, "rb") as f:
            info = os.fstat(f.fileno())
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
        token = data.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {getattr(e, 'strerror', None) or e}", param_hint="--token-file") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise click.BadParameter(f"{path} holds more than {MAX_TOKEN_FILE_BYTES} bytes: not a token file", param_hint="--token-file")
    if info.st_mode & 0o077:
        raise click.BadParameter(f"{path} can be read by other users; chmod 600 it", param_hint="--token-file")
    if not TOKEN_PATTERN.fullmatch(token):
        raise click.BadParameter(f"{path} must hold one token of 16..256 characters A-Z a-z 0-9 . _ ~ + -", param_hint="--token-file")
    return token


def served_summary(metrics_text: str) -> str:
    """What each model instance answered, from Triton's metrics (the models' t2f_requests / t2f_rows counters)."""
    counts: dict[str, dict[str, float]] = {}
    for name, labels, value in re.findall(r'^(t2f_requests|t2f_rows)\{([^}]*)\} ([0-9.e+]+)$', metrics_text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = "rows" if name == "t2f_rows" else fields.get("outcome", "answered")
        counts.setdefault(fields.get("instance", "?"), {})[key] = float(value)
    return "; ".join(f"{instance}: {int(c.get('answered', 0))} request(s), {int(c.get('rows', 0))} row(s), {int(c.get('refused', 0))} refused"
                     for instance, c in sorted(counts.items())) or "no counts"


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@pipeline_options(multiple_devices=True)
@click.option("--max-batch",        help="Largest batch the batcher forms, and most rows in one request", metavar="INT", type=click.IntRange(1, 256), default=32, show_default=True)
@click.option("--queue-delay-us",   help="How long a request may wait for others to batch with", metavar="INT", type=click.IntRange(0, 10_000_000), default=0, show_default=True)
@click.option("--host",             help="Address of the HTTP front and page (off loopback: needs --token-file)", metavar="ADDR", default="127.0.0.1", show_default=True)
@click.option("--http-port",        help="HTTP port: KServe v2 (checked, then forwarded to Triton's gRPC), /metrics, the page", metavar="INT", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-host",        help="Also open Triton's gRPC to TCP clients on ADDR: no token, and all of Triton's gRPC API, its "
                                         "system-shared-memory calls included (other local users could read requests with them) "
                                         "[default: none; the front uses a Unix socket only this user can open]", metavar="ADDR")
@click.option("--grpc-port",        help="Triton's gRPC port, with --grpc-host", metavar="INT", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port",     help="Triton's Prometheus port on 127.0.0.1 (also at HTTP /metrics)", metavar="INT", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--web",              help="Also serve the page where faces follow your typing (on --http-port)", is_flag=True)
@click.option("--allow-origin",     help="Another origin whose pages may open the page's WebSocket (repeat)", metavar="URL", multiple=True)
@click.option("--token-file",       help="File holding the bearer token clients and the page must send", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--tritonserver",     help="Your own tritonserver (ROOT/bin/tritonserver, with ROOT/backends/python) [default: nvidia-pytriton's]", metavar="PATH")
@click.option("--restarts",         help="Restarts of a Triton that died per --restart-window, with backoff; more wait for the window "
                                         "(0 = exit 1 when Triton dies)", metavar="INT", type=click.IntRange(0, 1000), default=5, show_default=True)
@click.option("--restart-window",   help="The window of --restarts, in seconds", metavar="S", type=click.IntRange(1, 86400), default=600, show_default=True)
@click.option("--max-connections",  help="Connections the front keeps open, a quarter of them from one address; more are answered 503",
                                    metavar="INT", type=click.IntRange(4, 1_000_000), default=1024, show_default=True)
@click.option("--max-body-memory",  help="MiB of request bodies the front holds at once, all requests together; more are answered 503",
                                    metavar="MIB", type=click.IntRange(1, 1 << 20), default=256, show_default=True)
@click.option("--write-repository", help="Write the Triton model repository into DIR and exit (for NVIDIA's Triton container)", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--verbose",          help="Triton's log on the console", is_flag=True)
def main(config: PipelineConfig, devices, max_batch, queue_delay_us, host, http_port, grpc_host, grpc_port, metrics_port, web,
         allow_origin, token_file, tritonserver, restarts, restart_window, max_connections, max_body_memory, write_repository, verbose):
    """Serve text -> faces on Triton Inference Server (a static model repository) behind a checking HTTP front, and optionally a live page.

    The generator and CLIP are the ones the mapper was trained for unless --generator / --clip are given;
    --cache also holds the server's workspace.

    \b
    Examples:
    # Offline smoke run on the CPU with random-weight tiny models, and the page on http://127.0.0.1:8000/:
    t2f-serve --mapper tiny --web

    \b
    # A trained mapper, one model instance on each of two GPUs, reachable from other machines with a token:
    t2f-serve --mapper runs/ffhq --device cuda:0 --device cuda:1 --precision fp16 --host 0.0.0.0 --token-file ~/.t2f-token

    \b
    # The repository for NVIDIA's Triton container (docs/serving.md):
    t2f-serve --mapper /models/ffhq --device cuda --write-repository ./t2f-repository
    """
    if not verbose:                 # grpc's "skipping fork() handlers" notes when Triton is started: not the user's business
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from t2f.devices import resolve_device

    from .connections import FrontLimits, fit_descriptors
    from .protocol import max_body_bytes
    from .repository import ModelOptions, write_repository as write
    from .supervise import RestartBudget, Stopped, supervise
    from .tritonserver import (Triton, TritonError, Workspace, clean_stale_workspaces, embedded_binaries, tighten_shared_memory,
                               user_binaries, workspace_parent)
    from .web import Front, FrontConfig

    ports = {"--http-port": http_port, "--metrics-port": metrics_port, **({"--grpc-port": grpc_port} if grpc_host is not None else {})}
    if len(set(ports.values())) != len(ports):
        raise click.BadParameter("every port must differ: " + ", ".join(f"{k} {v}" for k, v in ports.items()), param_hint="--http-port")
    backend, precision, artifacts, cache = config.backend, config.precision, config.artifacts, config.cache
    try:
        resolved = [resolve_device(d) for d in devices]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    try:
        for d in resolved:
            if precision is not None:
                precision.check_device(d)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--precision") from None
    try:                            # what "auto" resolves to here: the instances resolve it the same way
        from ..backends import BackendUnavailable, choose

        chosen = [choose(d, backend, precision, artifacts) for d in resolved]
    except BackendUnavailable as e:
        raise click.BadParameter(str(e), param_hint="--backend") from None
    devices = ["cpu" if d.type == "cpu" else f"cuda:{d.index or 0}" for d in resolved]
    token = read_token(token_file) if token_file else None
    if not is_loopback(host) and token is None and write_repository is None:
        raise click.BadParameter(f"--host {host} serves other machines: give --token-file (a bearer token clients must send)", param_hint="--host")
    if max_body_memory * 2**20 < max_body_bytes(max_batch):
        raise click.BadParameter(f"{max_body_memory} MiB is less than one request of --max-batch {max_batch} may send "
                                 f"({max_body_bytes(max_batch) / 2**20:.0f} MiB)", param_hint="--max-body-memory")
    for origin in allow_origin:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise click.BadParameter(f"{origin!r} is not an origin such as https://example.org:8443", param_hint="--allow-origin")
    mapper = config.mapper
    if write_repository is None:   # the mapper (a Hub one fetched) and its record here, in one line, before Triton starts
        from t2f.cli import user_errors
        from t2f.sources import resolve

        with user_errors():
            mapper = resolve(config.models).mapper           # the instances read this local copy
    absolute = lambda p: p if p is None or p in ("tiny",) or not os.path.exists(p) else os.path.abspath(p)   # noqa: E731
    options = ModelOptions(generator=absolute(config.generator), clip=config.clip, mapper=absolute(mapper), backend=backend,
                           artifacts=absolute(artifacts), precision=str(precision or "auto"), batch_size=config.batch_size,
                           cache=os.path.abspath(cache) if cache else None)

    if write_repository is not None:
        try:
            paths = write(write_repository, options, devices, max_batch=max_batch, queue_delay_us=queue_delay_us, file_mode=0o644)
        except OSError as e:                                     # a refused path names its file; other errors say why
            raise click.ClickException(f"--write-repository {write_repository}: {e if isinstance(e, PathError) else e.strerror or e}") from None
        click.echo(f"wrote {len(paths)} files: {TEXT_MODEL} and {IMAGE_MODEL} in {write_repository} "
                   f"({len(devices)} instance(s) each on {', '.join(devices)}); serve it with tritonserver --model-repository "
                   f"{write_repository} --model-control-mode none", err=True)
        return

    limits, lowered = fit_descriptors(FrontLimits(max_connections=max_connections, max_connections_per_client=max(1, max_connections // 4),
                                                  max_body_memory=max_body_memory * 2**20))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    front = workspace = triton = None
    summary = ""
    try:
        parent = workspace_parent(cache)                         # 0700, the user's alone: checked before anything in it is touched
        removed = clean_stale_workspaces(parent)
        if removed:
            click.echo(f"removed {len(removed)} workspace(s) of stopped servers: {', '.join(removed)}", err=True)
        workspace = Workspace(parent)
        binaries = user_binaries(tritonserver) if tritonserver else embedded_binaries(workspace.path)
        triton = Triton(binaries, workspace, grpc_host=grpc_host, grpc_port=grpc_port, metrics_port=metrics_port, verbose=verbose)
        front_config = FrontConfig(grpc_url=triton.grpc_url, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", max_batch=max_batch,
                                   page=web, max_count=min(16, max_batch), token=token, allow_origins=tuple(allow_origin), host=host,
                                   limits=limits)
        front = Front(front_config, host, http_port)                   # binds now: a port clash fails before Triton starts
        write(workspace.repository, options, devices, max_batch=max_batch, queue_delay_us=queue_delay_us)
        click.echo(f"starting Triton Inference Server ({len(devices)} instance(s) per model on {', '.join(devices)})", err=True)
        triton.start(cancel=stop)
        front.start()
        where = "every interface" if host in ("0.0.0.0", "::") else host
        grpc = f"gRPC {grpc_host}:{grpc_port} (no token)" if grpc_host is not None else f"gRPC {triton.grpc_url} (this user only)"
        click.echo(f"serving {TEXT_MODEL} and {IMAGE_MODEL}: HTTP {where}:{http_port} (checked, to Triton's gRPC), "
                   f"{grpc}, metrics 127.0.0.1:{metrics_port}; max batch {max_batch}; "
                   + ", ".join(f"{cls.name} {p} on {d}" for (cls, p), d in zip(chosen, devices)), err=True)
        if lowered:
            click.echo(lowered, err=True)
        if token is not None:
            click.echo(f"token required: clients send Authorization: Bearer TOKEN (from {token_file})"
                       + (f"; gRPC on {grpc_host} has no token" if grpc_host is not None else ""), err=True)
        if web:
            click.echo(f"page: http://{'127.0.0.1' if where == 'every interface' else host}:{http_port}/"
                       + ("#token=TOKEN" if token is not None else ""), err=True)
        click.echo("ready; Ctrl-C to stop", err=True)

        def tighten():
            with contextlib.suppress(TritonError):
                tighten_shared_memory(workspace.shm_prefix)
        supervise(triton, stop, RestartBudget(restarts, restart_window), lambda line: click.echo(printable(line), err=True),
                  errors=(TritonError, OSError), every=tighten)
        with contextlib.suppress(OSError), urllib.request.urlopen(front_config.metrics_url, timeout=5) as r:
            summary = served_summary(r.read().decode("utf-8", "replace"))
    except (T2FError, OSError, Stopped) as e:             # t2f's own (TritonError, FrontError, ...) and the OS's
        if not stop.is_set():                                     # Ctrl-C while starting also stops Triton: not an error
            raise click.ClickException(printable(" ".join(str(e).split()))) from None
    finally:
        if front is not None:
            front.stop()
        if triton is not None:
            triton.stop()
        if workspace is not None:
            workspace.remove()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if summary:
        click.echo(f"served: {summary}", err=True)
    click.echo("stopped", err=True)
