"""t2f-serve's front: the KServe v2 HTTP routes, checked before anything reaches Triton, and the page where faces follow typing.

Triton 2.51's HTTP front end dies on crafted bodies (a shape of 2^40 rows, 300,000 nested `[`), so
it stays off: this Starlette app takes HTTP on --http-port, checks each body against the protocol
(kserve.py: size, encoding, JSON, names, datatypes, shapes and data; each refusal one line to
the client and one in t2f-serve's log, what the client sent escaped) and forwards it to Triton over
gRPC. Only inference, health, metadata and metrics are offered: no repository API. Below the app,
connections.py bounds request heads, idle and slow connections and their number; bodies
are bounded here (size, bytes held across requests, stalls and pace: FrontLimits).

The page (page.py, with --web) talks over a WebSocket. A handshake whose Origin is not the
page's own (or one of --allow-origin) is refused, as is a Host that is not this server's (DNS
rebinding). With a token (--token-file; required off loopback) every route but the page itself and
the health checks needs `Authorization: Bearer TOKEN`; the page sends it as WebSocket subprotocol
`t2f.bearer.TOKEN`, taken from the address's fragment (`http://HOST:PORT/#token=TOKEN`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import sys
import threading
import time

from t2f.errors import T2FError
from t2f.files import printable

from .addresses import bind_port, is_loopback
from .connections import FrontLimits, guarded_protocol
from .kserve import BodyBudget, Forwarder, Refused, byte_count, parse_infer_body, read_body, response_body
from .page import MAX_FRAME_BYTES, Frames, converse, page_html
from .protocol import INPUTS, MAX_BATCH, MODELS, BadRequest, max_body_bytes


class FrontError(T2FError):
    """The HTTP front did not start; the message is one line."""


# ----------------------------------------------------------------------------
# The app.


@dataclasses.dataclass(frozen=True)
class FrontConfig:
    grpc_url: str                          # this server's Triton
    metrics_url: str | None = None         # Triton's Prometheus metrics, passed on at GET /metrics
    max_batch: int = 32                    # rows a request may carry (the models' max_batch_size)
    page: bool = False                     # serve the page (/ and /ws)
    max_count: int = 16                    # faces per page frame
    token: str | None = None               # bearer token; None = none needed (loopback only)
    allow_origins: tuple[str, ...] = ()    # origins besides the page's own that may open /ws
    host: str = "127.0.0.1"                # the address bound (a Host header naming it is accepted)
    log_refusals: bool = True              # one line on stderr per refused request
    limits: FrontLimits = FrontLimits()    # heads, connections, bodies (connections.py)


def _log(config: FrontConfig, line: str) -> None:
    """One line on stderr; what a client sent (paths, datatypes, names) is escaped, so it cannot forge or hide lines."""
    if config.log_refusals:
        print(f"t2f-serve: {printable(line, limit=1000)}", file=sys.stderr, flush=True)


def _say(config: FrontConfig, client, what: str, message: str) -> None:
    _log(config, f"refused {what} from {client[0] if client else '?'}: {message}")


def _host_ok(config: FrontConfig, host_header: str | None) -> bool:
    if config.token is not None:            # a token guards everything; names vary behind proxies
        return True
    if not host_header:
        return False
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return is_loopback(name) or name == config.host or name.strip("[]") == config.host


def _token_ok(config: FrontConfig, presented: str | None) -> bool:
    return config.token is None or (presented is not None and hmac.compare_digest(presented.encode(), config.token.encode()))


def create_app(config: FrontConfig):
    """The Starlette app: KServe v2 HTTP (checked, forwarded over gRPC), GET /metrics, and with config.page the page and /ws."""
    from google.protobuf import json_format
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from tritonclient.grpc import service_pb2

    forwarder = Forwarder(config.grpc_url)
    frames = Frames(forwarder, config.max_count)
    html = page_html() if config.page else ""
    limit = max_body_bytes(config.max_batch)
    budget = BodyBudget(config.limits.max_body_memory)
    open_paths = {"/", "/v2/health/live", "/v2/health/ready"}

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    def refused(request, e: Exception):
        status = e.status if isinstance(e, Refused) else 400
        _say(config, request.client, f"{request.method} {request.url.path}", str(e))
        return error(status, str(e))

    def model_of(request) -> tuple[str, str]:
        model, version = request.path_params["model"], request.path_params.get("version", "")
        if model not in MODELS:
            raise Refused(404, f"unknown model {model!r}; t2f serves {', '.join(MODELS)}")
        return model, version

    async def guarded(handler, request):
        if not _host_ok(config, request.headers.get("host")):
            return refused(request, Refused(421, f"Host {request.headers.get('host')!r} is not this server's"))
        if request.url.path not in open_paths:
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            if not _token_ok(config, presented if scheme.lower() == "bearer" else None):
                return refused(request, Refused(401, "this server needs Authorization: Bearer TOKEN (t2f-serve --token-file)"))
        try:
            return await handler(request)
        except (Refused, BadRequest) as e:
            return refused(request, e)
        except ClientDisconnect:                     # the client left: nobody reads an answer
            return Response(status_code=400)
        except Exception as e:                       # a bug: one line in the log and to the client, never a traceback
            return refused(request, Refused(500, f"internal error: {type(e).__name__}"))

    def route(path, handler, methods=("GET",)):
        async def endpoint(request):
            return await guarded(handler, request)
        return Route(path, endpoint, methods=list(methods))

    async def index(request):
        return HTMLResponse(html)

    async def live(request):
        return Response(status_code=200)

    async def ready(request):
        return Response(status_code=200 if await forwarder.ready() else 503)

    async def server_metadata(request):
        m = await forwarder.call("ServerMetadata", service_pb2.ServerMetadataRequest(), timeout=10)
        return JSONResponse(dict(name=m.name, version=m.version, extensions=list(m.extensions)))

    async def model_metadata(request):
        model, version = model_of(request)
        m = await forwarder.call("ModelMetadata", service_pb2.ModelMetadataRequest(name=model, version=version), timeout=10)
        tensors = lambda ts: [dict(name=t.name, datatype=t.datatype, shape=[int(d) for d in t.shape]) for t in ts]  # noqa: E731
        return JSONResponse(dict(name=m.name, versions=list(m.versions), platform=m.platform, inputs=tensors(m.inputs), outputs=tensors(m.outputs)))

    async def model_ready(request):
        model, version = model_of(request)
        r = await forwarder.call("ModelReady", service_pb2.ModelReadyRequest(name=model, version=version), timeout=10)
        return Response(status_code=200 if r.ready else 400)

    async def model_config(request):
        model, version = model_of(request)
        r = await forwarder.call("ModelConfig", service_pb2.ModelConfigRequest(name=model, version=version), timeout=10)
        return JSONResponse(json_format.MessageToDict(r.config, preserving_proto_field_name=True))

    async def infer(request):
        model, version = model_of(request)
        length = request.headers.get("inference-header-content-length")
        length = byte_count(length, "Inference-Header-Content-Length") if length is not None else None
        with budget.hold() as share:
            body = await read_body(request.stream(), request.headers, limit, share, config.limits.body_stall_s, config.limits.min_body_rate)
            try:
                parsed = parse_infer_body(body, length, model, config.max_batch)
            finally:
                del body[:]                  # a refusal's traceback keeps this frame: not the bytes
            try:
                response = await forwarder.infer(model, version, parsed.inputs, [name for name, _ in parsed.outputs], parsed.id)
            finally:
                del parsed.inputs[:]
        content, headers = await asyncio.get_running_loop().run_in_executor(None, response_body, response, parsed)
        return Response(content, headers=headers)

    async def metrics(request):
        if config.metrics_url is None:
            raise Refused(404, "no metrics")
        import urllib.request

        def fetch():
            with urllib.request.urlopen(config.metrics_url, timeout=5) as r:
                return r.read()
        try:
            text = await asyncio.get_running_loop().run_in_executor(None, fetch)
        except OSError:
            raise Refused(503, "Triton's metrics are not available") from None
        return PlainTextResponse(text.decode("utf-8", "replace"))

    async def socket(websocket):
        headers = websocket.headers
        client = websocket.client
        if not _host_ok(config, headers.get("host")):
            _say(config, client, "WebSocket", f"Host {headers.get('host')!r} is not this server's")
            return await websocket.close(code=1008)
        origin = headers.get("origin")
        own = {f"http://{headers.get('host')}", f"https://{headers.get('host')}"}
        if origin is not None and origin not in own and origin not in config.allow_origins:
            _say(config, client, "WebSocket", f"Origin {origin!r} is not this page's (t2f-serve --allow-origin)")
            return await websocket.close(code=1008)
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        bearer = next((p[len("t2f.bearer."):] for p in offered if p.startswith("t2f.bearer.")), None)
        if not _token_ok(config, bearer):
            _say(config, client, "WebSocket", "no token or a wrong one")
            return await websocket.close(code=1008)
        await websocket.accept(subprotocol=f"t2f.bearer.{bearer}" if bearer is not None else None)
        await converse(websocket, frames, lambda what, message: _say(config, client, what, message))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await forwarder.open()
        yield
        await forwarder.close()

    v = "/v2/models/{model}/versions/{version}"
    m = "/v2/models/{model}"
    routes = [route("/v2/health/live", live), route("/v2/health/ready", ready), route("/v2", server_metadata),
              route(m, model_metadata), route(v, model_metadata), route(m + "/ready", model_ready), route(v + "/ready", model_ready),
              route(m + "/config", model_config), route(v + "/config", model_config),
              route(m + "/infer", infer, ("POST",)), route(v + "/infer", infer, ("POST",)), route("/metrics", metrics)]
    if config.page:
        routes += [route("/", index), WebSocketRoute("/ws", socket)]
    return Starlette(routes=routes, lifespan=lifespan)

class Front:
    """uvicorn serving the app on a thread of its own, on a socket bound before Triton starts (a port clash fails first)."""

    def __init__(self, config: FrontConfig, host: str, port: int):
        self.socket = bind_port(host, port, "--http-port")
        self.config, self.host, self.port = config, host, port
        self.server = self.thread = None

    def start(self, timeout_s: float = 30.0) -> None:
        import uvicorn

        limits = self.config.limits
        protocol = guarded_protocol(limits, lambda line: _log(self.config, line))
        uv = uvicorn.Config(create_app(self.config), http=protocol, log_level="critical", lifespan="on", access_log=False,
                            ws_max_size=MAX_FRAME_BYTES, ws_ping_interval=20, timeout_keep_alive=int(limits.idle_timeout_s) or 1,
                            h11_max_incomplete_event_size=limits.max_head_bytes)
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.socket]), name="t2f-front", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise FrontError(f"the HTTP front did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        self.socket.close()


__all__ = ["FrontConfig", "Front", "create_app", "parse_infer_body", "read_body", "MAX_BATCH", "INPUTS"]
