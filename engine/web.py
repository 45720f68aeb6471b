"""t2f-serve's front: the KServe v2 HTTP routes, checked before anything reaches Triton, and the page where faces follow typing.

Triton 2.51's HTTP front end dies on crafted bodies (a shape of 2^40 rows, 300,000 nested `[`), so
it stays off: this Starlette app takes HTTP on --http-port, checks each body against the protocol
(engine/protocol.py) and forwards it to Triton over gRPC. Checks, each refused with one line (and
one line in t2f-serve's log): body size (413), Content-Encoding other than gzip / deflate, or one
that expands past the size limit (415 / 413), JSON size and nesting depth, input names, datatypes,
ranks, rows and face sizes (before any data is read into arrays), element counts and string
lengths (400). Only inference, health, metadata and metrics are offered: no repository API.

The page (engine/static/index.html, with --web) talks over a WebSocket. Each keystroke sends the
whole text; per client only the newest pending message is kept. A handshake whose Origin is not
the page's own (or one of --allow-origin) is refused, as is a Host that is not this server's
(DNS rebinding); odd frames (binary, too big, not JSON, too deep) close the socket with a code.
With a token (--token-file; required off loopback) every route but the page itself and the health
checks needs `Authorization: Bearer TOKEN`; the page sends it as WebSocket subprotocol
`t2f.bearer.TOKEN`, taken from the address's fragment (`http://HOST:PORT/#token=TOKEN`).

Client -> server (JSON):
    {"type": "text",  "id": 7, "prompt": "...", "seed": 0, "truncation": 0.7, "count": 4, "noise_mode": "const"}
    {"type": "image", "id": 8, "index": 2, "seed": 0, "truncation": 0.7, "count": 4}   more faces like face 2 of the last frame
Server -> client: a JSON header, then for a frame one binary message of count * height * width * 3 bytes:
    {"type": "frame", "id": 7, "count": 4, "height": 64, "width": 64, "server_ms": 12.5, "label": "..."}
    {"type": "error", "id": 7, "message": "..."}
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import importlib.resources
import json
import struct
import sys
import threading
import time
import zlib

import numpy as np

from .protocol import (DTYPES, IMAGE_MODEL, INPUTS, ITEM_BYTES, MAX_BATCH, MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_NOISE_MODE_BYTES,
                       MAX_PROMPT_BYTES, MAX_SEED, MODELS, OUTPUTS, TEXT_MODEL, TRUNCATION_RANGE, BadRequest, check_inputs,
                       json_depth_exceeds, max_body_bytes)

MAX_FRAME_BYTES = 64 * 1024          # A page message (JSON); larger ones close the socket (1009).
STRING_LIMITS = {"prompt": MAX_PROMPT_BYTES, "noise_mode": MAX_NOISE_MODE_BYTES}
GRPC_MAX_MESSAGE = 512 * 1024 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def page_html() -> str:
    return importlib.resources.files("t2f.engine").joinpath("static/index.html").read_text(encoding="utf-8")


class Refused(Exception):
    """A request the front answers with `status` and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------
# KServe v2 HTTP bodies <-> tensors.


@dataclasses.dataclass
class Input:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes                       # Triton's raw form: little-endian values; BYTES elements as uint32 length + bytes


@dataclasses.dataclass
class InferBody:
    id: str
    inputs: list[Input]
    outputs: list[tuple[str, bool]]  # requested (name, binary); empty = every output
    binary_default: bool             # binary_data_output: outputs not named in `outputs` come back binary


def encode_strings(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def check_strings(raw: bytes, count: int, name: str) -> None:
    """Raw BYTES of `count` elements, each at most its limit; BadRequest otherwise."""
    limit, offset = STRING_LIMITS.get(name, MAX_PROMPT_BYTES), 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise BadRequest(f"input {name}: its data ends before {count} elements")
        (length,) = struct.unpack_from("<I", raw, offset)
        if length > limit:
            raise BadRequest(f"{name} is too long: {length} bytes, at most {limit}")
        offset += 4 + length
    if offset != len(raw):
        raise BadRequest(f"input {name}: {len(raw)} bytes of data hold more than {count} elements or end inside one")


def _flatten(data, name: str) -> list:
    out, stack = [], [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def json_tensor(data, datatype: str, count: int, name: str) -> bytes:
    """A JSON input's "data" (flat or nested) -> raw bytes of `count` elements."""
    values = _flatten(data, name)
    if len(values) != count:
        raise BadRequest(f"input {name} has {len(values)} values, its shape holds {count}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise BadRequest(f"input {name}: BYTES data must be strings")
        encoded = [v.encode("utf-8", "surrogatepass") for v in values]
        raw = encode_strings(encoded)
        check_strings(raw, count, name)
        return raw
    if datatype in ("INT64", "UINT8"):
        if not all(type(v) is int for v in values):
            raise BadRequest(f"input {name}: {datatype} data must be integers")
        info = np.iinfo(DTYPES[datatype])
        if values and not (info.min <= min(values) and max(values) <= info.max):
            raise BadRequest(f"input {name}: a value is outside {datatype}'s range")
    elif not all(type(v) in (int, float) for v in values):
        raise BadRequest(f"input {name}: {datatype} data must be numbers")
    return np.asarray(values, dtype=DTYPES[datatype]).astype(np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()


def parse_infer_body(body: bytes, header_length: int | None, model: str, max_batch: int) -> InferBody:
    """A KServe v2 infer body (JSON, then binary tensors where Inference-Header-Content-Length says) -> InferBody; BadRequest."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length} is outside the body's {len(body)} bytes")
    if header_length > MAX_JSON_BYTES:
        raise BadRequest(f"the JSON part of the body is {header_length} bytes, more than {MAX_JSON_BYTES}; send tensors in binary")
    header = body[:header_length]
    if json_depth_exceeds(header, MAX_JSON_DEPTH):
        raise BadRequest(f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        request = json.loads(header)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON (or its JSON part, per Inference-Header-Content-Length)") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest('the body must be a JSON object with a list "inputs"')
    declared = []
    for tensor in request["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or not isinstance(tensor.get("datatype"), str):
            raise BadRequest('every input needs a "name", a "datatype" and a "shape"')
        declared.append((tensor["name"], tensor["datatype"], tensor.get("shape")))
    counts = check_inputs(model, declared, max_batch)             # shapes checked before any data is looked at
    binary, offset, inputs = body[header_length:], 0, []
    for tensor in request["inputs"]:
        name, datatype, shape = tensor["name"], tensor["datatype"], list(tensor["shape"])
        parameters = tensor.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if type(size) is not int or not 0 <= size <= len(binary) - offset:
                raise BadRequest(f"input {name}: binary_data_size {size} is more than the body holds")
            raw = binary[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                check_strings(raw, counts[name], name)
            elif len(raw) != counts[name] * ITEM_BYTES[datatype]:
                raise BadRequest(f"input {name}: {len(raw)} bytes of data, its shape {shape} of {datatype} holds {counts[name] * ITEM_BYTES[datatype]}")
        elif "data" in tensor:
            raw = json_tensor(tensor["data"], datatype, counts[name], name)
        else:
            raise BadRequest(f"input {name} has no data")
        inputs.append(Input(name, datatype, shape, bytes(raw)))
    if offset != len(binary):
        raise BadRequest(f"the body holds {len(binary) - offset} bytes after the last binary tensor")
    outputs, names = [], {t.name for t in OUTPUTS}
    for tensor in request.get("outputs") or []:
        if not isinstance(tensor, dict) or tensor.get("name") not in names:
            raise BadRequest(f"outputs may name {', '.join(sorted(names))}")
        parameters = tensor.get("parameters") or {}
        outputs.append((tensor["name"], bool(parameters.get("binary_data", False)) if isinstance(parameters, dict) else False))
    parameters = request.get("parameters") or {}
    binary_default = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    request_id = request.get("id", "")
    return InferBody(request_id if isinstance(request_id, str) else "", inputs, outputs, binary_default)


def response_body(response, body: InferBody) -> tuple[bytes, dict]:
    """A gRPC ModelInferResponse -> (KServe v2 HTTP body, headers)."""
    binary_of = dict(body.outputs)
    header = dict(model_name=response.model_name, model_version=response.model_version, outputs=[])
    if body.id:
        header["id"] = body.id
    chunks = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if body.outputs and tensor.name not in binary_of:
            continue
        entry = dict(name=tensor.name, datatype=tensor.datatype, shape=[int(d) for d in tensor.shape])
        if binary_of.get(tensor.name, body.binary_default):
            entry["parameters"] = dict(binary_data_size=len(raw))
            chunks.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype=np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")).tolist()
        header["outputs"].append(entry)
    text = json.dumps(header).encode()
    if not chunks:
        return text, {"content-type": "application/json"}
    return text + b"".join(chunks), {"content-type": "application/octet-stream", "inference-header-content-length": str(len(text))}


async def read_body(receive_stream, headers, limit: int) -> bytes:
    """The request body, decompressed (gzip / deflate), at most `limit` bytes either way; Refused otherwise."""
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise Refused(413, f"the body is {length} bytes, more than {limit}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise Refused(415, f"Content-Encoding {encoding} is not supported (gzip, deflate or none)")
    inflate = zlib.decompressobj(31 if encoding == "gzip" else 15) if encoding != "identity" else None
    parts, size = [], 0
    async for chunk in receive_stream:
        if inflate is not None:
            chunk = inflate.decompress(chunk, limit - size + 1)
            if inflate.unconsumed_tail:
                raise Refused(413, f"the body expands past {limit} bytes")
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the body is more than {limit} bytes")
        parts.append(chunk)
    if inflate is not None:
        try:
            tail = inflate.flush()
        except zlib.error:
            tail = b""
        if not inflate.eof:
            raise Refused(400, f"the {encoding} body is truncated or corrupt")
        parts.append(tail)
    return b"".join(parts)


# ----------------------------------------------------------------------------
# Triton over gRPC.


GRPC_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 413, "DEADLINE_EXCEEDED": 504,
               "UNIMPLEMENTED": 501}


class Forwarder:
    """A gRPC channel to this server's Triton, opened in the app's event loop."""

    def __init__(self, grpc_url: str):
        self.grpc_url = grpc_url
        self.channel = self.stub = None

    async def open(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        options = [("grpc.max_send_message_length", GRPC_MAX_MESSAGE), ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE)]
        self.channel = grpc.aio.insecure_channel(self.grpc_url, options=options)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def call(self, method: str, request, timeout: float | None = None):
        import grpc

        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            details = " ".join(str(e.details() or e.code().name).split())
            raise Refused(GRPC_STATUS.get(e.code().name, 500), details.removeprefix("[request id: <id_unknown>] ")) from None

    async def infer(self, model: str, version: str, inputs: list[Input], outputs=(), request_id: str = ""):
        from tritonclient.grpc import service_pb2

        request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for tensor in inputs:
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            request.raw_input_contents.append(tensor.raw)
        for name in outputs:
            request.outputs.add(name=name)
        return await self.call("ModelInfer", request)

    async def ready(self) -> bool:
        from tritonclient.grpc import service_pb2

        with contextlib.suppress(Refused):
            if (await self.call("ServerReady", service_pb2.ServerReadyRequest(), timeout=5)).ready:
                return True
        return False


# ----------------------------------------------------------------------------
# The page's frames.


class Frames:
    """Page messages -> one request each to the t2f models (the same batcher as API clients)."""

    def __init__(self, forwarder: Forwarder, max_count: int):
        self.forwarder, self.max_count = forwarder, max_count

    def _settings(self, message: dict) -> tuple[int, float, int]:
        try:
            seed, psi, count = int(message.get("seed", 0)), float(message.get("truncation", 0.7)), int(message.get("count", 4))
        except (TypeError, ValueError, OverflowError):
            raise BadRequest("seed, truncation and count must be numbers") from None
        if not 0 <= seed <= MAX_SEED:
            raise BadRequest(f"seed must be in 0..{MAX_SEED}")
        if not TRUNCATION_RANGE[0] <= psi <= TRUNCATION_RANGE[1]:                 # NaN fails this too
            raise BadRequest(f"truncation must be in [{TRUNCATION_RANGE[0]:g}, {TRUNCATION_RANGE[1]:g}]")
        if not 1 <= count <= self.max_count:
            raise BadRequest(f"count must be in 1..{self.max_count}")
        return seed, psi, count

    async def infer(self, message: dict, last: np.ndarray | None) -> np.ndarray:
        """A message -> faces [count, H, W, 3] uint8: `count` samples of one seed (t2f-infer --n count)."""
        seed, psi, count = self._settings(message)
        if message.get("type") == "image":
            index = message.get("index", -1)
            if last is None or type(index) is not int or not 0 <= index < len(last):
                raise BadRequest("no such face to start from")
            model = IMAGE_MODEL
            first = Input("image", "UINT8", [count, *last.shape[1:]], np.repeat(last[index:index + 1], count, axis=0).tobytes())
        else:
            prompt = message.get("prompt", "")
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be text")
            model, first = TEXT_MODEL, Input("prompt", "BYTES", [count, 1], encode_strings([prompt.encode("utf-8", "replace")] * count))
        inputs = [first, Input("seed", "INT64", [count, 1], np.full(count, seed, "<i8").tobytes()),
                  Input("truncation", "FP32", [count, 1], np.full(count, psi, "<f4").tobytes()),
                  Input("sample", "INT64", [count, 1], np.arange(count, dtype="<i8").tobytes())]
        check_inputs(model, [(t.name, t.datatype, t.shape) for t in inputs], self.max_count)
        response = await self.forwarder.infer(model, "", inputs, outputs=["image"])
        tensor = response.outputs[0]
        return np.frombuffer(response.raw_output_contents[0], np.uint8).reshape([int(d) for d in tensor.shape])


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


def _say(config: FrontConfig, client, what: str, message: str) -> None:
    if config.log_refusals:
        where = f"{client[0]}" if client else "?"
        print(f"t2f-serve: refused {what} from {where}: {message}", file=sys.stderr, flush=True)


def _host_ok(config: FrontConfig, host_header: str | None) -> bool:
    if config.token is not None:            # a token guards everything; names vary behind proxies
        return True
    if not host_header:
        return False
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return name.lower() in LOOPBACK_NAMES or name == config.host or name.strip("[]") == config.host


def _token_ok(config: FrontConfig, presented: str | None) -> bool:
    return config.token is None or (presented is not None and hmac.compare_digest(presented.encode(), config.token.encode()))


def create_app(config: FrontConfig):
    """The Starlette app: KServe v2 HTTP (checked, forwarded over gRPC), GET /metrics, and with config.page the page and /ws."""
    from google.protobuf import json_format
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocketDisconnect
    from tritonclient.grpc import service_pb2

    forwarder = Forwarder(config.grpc_url)
    frames = Frames(forwarder, config.max_count)
    html = page_html() if config.page else ""
    limit = max_body_bytes(config.max_batch)
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
        body = await read_body(request.stream(), request.headers, limit)
        length = request.headers.get("inference-header-content-length")
        if length is not None and not length.isdigit():
            raise BadRequest("Inference-Header-Content-Length must be a number")
        parsed = parse_infer_body(body, int(length) if length is not None else None, model, config.max_batch)
        del body
        response = await forwarder.infer(model, version, parsed.inputs, [name for name, _ in parsed.outputs], parsed.id)
        content, headers = response_body(response, parsed)
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
        newest: dict = {}                 # the newest message not yet answered (older ones are dropped)
        arrived = asyncio.Event()

        async def receive():
            while True:
                event = await websocket.receive()
                if event["type"] == "websocket.disconnect":
                    return
                text = event.get("text")
                if text is None:
                    return 1003, "binary frames are not part of this protocol"
                if len(text) > MAX_FRAME_BYTES:
                    return 1009, f"a message may hold {MAX_FRAME_BYTES} bytes"
                if json_depth_exceeds(text, MAX_JSON_DEPTH):
                    return 1007, f"a message may nest {MAX_JSON_DEPTH} levels"
                try:
                    message = json.loads(text)
                except (ValueError, RecursionError):
                    return 1007, "a message must be a JSON object"
                if not isinstance(message, dict):
                    return 1007, "a message must be a JSON object"
                newest["message"] = message
                arrived.set()

        async def answer():
            last = None
            while True:
                await arrived.wait()
                arrived.clear()
                message = newest.pop("message")
                start = time.perf_counter()
                message_id = message.get("id") if isinstance(message.get("id"), (int, str)) else None
                try:
                    faces = await frames.infer(message, last)
                except (BadRequest, Refused) as e:        # a refused request or Triton's error: tell this page, keep serving
                    await websocket.send_text(json.dumps(dict(type="error", id=message_id, message=str(e).removeprefix("bad request: "))))
                    continue
                last = faces
                label = str(message.get("prompt", ""))[:MAX_PROMPT_BYTES] if message.get("type") != "image" else f"like face {message.get('index')}"
                header = dict(type="frame", id=message_id, count=int(faces.shape[0]), height=int(faces.shape[1]),
                              width=int(faces.shape[2]), server_ms=round((time.perf_counter() - start) * 1000, 2), label=label)
                await websocket.send_text(json.dumps(header))
                await websocket.send_bytes(np.ascontiguousarray(faces).tobytes())

        tasks = [asyncio.ensure_future(receive()), asyncio.ensure_future(answer())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                result = task.exception() or task.result()
                if isinstance(result, tuple):                        # an odd frame: close with its code
                    _say(config, client, "WebSocket frame", result[1])
                    with contextlib.suppress(Exception):
                        await websocket.close(code=result[0], reason=result[1][:120])
                elif isinstance(result, BaseException) and not isinstance(result, (WebSocketDisconnect, RuntimeError, OSError)):
                    _say(config, client, "WebSocket", f"{type(result).__name__}: {' '.join(str(result).split())[:200]}")
                    with contextlib.suppress(Exception):
                        await websocket.close(code=1011)
        finally:
            for task in tasks:
                task.cancel()

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
        import socket as sockets

        family = sockets.AF_INET6 if ":" in host else sockets.AF_INET
        self.socket = sockets.socket(family, sockets.SOCK_STREAM)
        self.socket.setsockopt(sockets.SOL_SOCKET, sockets.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as e:
            self.socket.close()
            raise OSError(f"port {port} on {host} is in use (--http-port): {e.strerror}") from None
        self.config, self.host, self.port = config, host, port
        self.server = self.thread = None

    def start(self, timeout_s: float = 30.0) -> None:
        import uvicorn

        uv = uvicorn.Config(create_app(self.config), log_level="critical", lifespan="on", access_log=False,
                            ws_max_size=MAX_FRAME_BYTES, ws_ping_interval=20, timeout_keep_alive=30, h11_max_incomplete_event_size=64 * 1024)
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.socket]), name="t2f-front", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP front did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        self.socket.close()


__all__ = ["FrontConfig", "Front", "create_app", "parse_infer_body", "read_body", "MAX_BATCH", "INPUTS"]
