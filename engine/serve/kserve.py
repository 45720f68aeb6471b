"""KServe v2 over HTTP <-> Triton over gRPC: t2f-serve's front checks each body here before any of it reaches Triton.

Checks, each refused with one line: the body's size (413), a Content-Encoding other than gzip /
deflate, or one that expands past the size limit (415 / 413), or is not what it says (400), the
bytes all requests hold at once (503), a body that stalls or crawls (408), the JSON's size and
nesting depth, input names, datatypes, ranks, rows and face sizes (before any data is read into
arrays), element counts, number ranges and string lengths (400); the protocol's table and limits
are protocol.py's. A malformed request is the client's fault: never a 500.
`Forwarder` then sends the checked tensors to Triton over gRPC (Triton's own HTTP front end dies
on crafted bodies, so it stays off).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import struct
import zlib

import numpy as np

from t2f.files import json_depth_exceeds
from t2f.errors import T2FError

from .protocol import (DTYPES, ITEM_BYTES, MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_JSON_OUTPUT_VALUES, MAX_NOISE_MODE_BYTES,
                       MAX_PROMPT_BYTES, OUTPUTS, BadRequest, check_inputs)

STRING_LIMITS = {"prompt": MAX_PROMPT_BYTES, "noise_mode": MAX_NOISE_MODE_BYTES}
GRPC_MAX_MESSAGE = 512 * 1024 * 1024


class Refused(T2FError):
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
    try:
        array = np.asarray(values, dtype=DTYPES[datatype])
    except OverflowError:                                         # an integer of hundreds of digits as a float
        raise BadRequest(f"input {name}: a value is outside {datatype}'s range") from None
    return array.astype(np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()


def copy_of(body: bytes | bytearray, start: int, stop: int) -> bytes:
    """body[start:stop] as bytes, copied once (a bytearray's slice would copy twice); no view of `body` outlives the call, so
    the caller can empty it."""
    with memoryview(body) as view:
        return bytes(view[start:stop])


def parse_infer_body(body: bytes | bytearray, header_length: int | None, model: str, max_batch: int) -> InferBody:
    """A KServe v2 infer body (JSON, then binary tensors where Inference-Header-Content-Length says) -> InferBody; BadRequest."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length} is outside the body's {len(body)} bytes")
    if header_length > MAX_JSON_BYTES:
        raise BadRequest(f"the JSON part of the body is {header_length} bytes, more than {MAX_JSON_BYTES}; send tensors in binary")
    header = copy_of(body, 0, header_length)
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
    offset, end, inputs = header_length, len(body), []
    for tensor in request["inputs"]:
        name, datatype, shape = tensor["name"], tensor["datatype"], list(tensor["shape"])
        parameters = tensor.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if type(size) is not int or not 0 <= size <= end - offset:
                raise BadRequest(f"input {name}: binary_data_size {size} is more than the body holds")
            raw = copy_of(body, offset, offset + size)
            offset += size
            if datatype == "BYTES":
                check_strings(raw, counts[name], name)
            elif len(raw) != counts[name] * ITEM_BYTES[datatype]:
                raise BadRequest(f"input {name}: {len(raw)} bytes of data, its shape {shape} of {datatype} holds {counts[name] * ITEM_BYTES[datatype]}")
        elif "data" in tensor:
            raw = json_tensor(tensor["data"], datatype, counts[name], name)
        else:
            raise BadRequest(f"input {name} has no data")
        inputs.append(Input(name, datatype, shape, raw))
    if offset != end:
        raise BadRequest(f"the body holds {end - offset} bytes after the last binary tensor")
    outputs, names = [], {t.name for t in OUTPUTS}
    if not isinstance(request.get("outputs") or [], list):
        raise BadRequest('"outputs" must be a list')
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
    """A gRPC ModelInferResponse -> (KServe v2 HTTP body, headers).

    Outputs asked for as JSON may carry MAX_JSON_OUTPUT_VALUES values together (a JSON number costs a Python int and
    its text: about 12 bytes a value); an answer past it is refused (400) before any list is built: ask for binary data.
    """
    binary_of = dict(body.outputs)
    wanted = [(tensor, raw) for tensor, raw in zip(response.outputs, response.raw_output_contents)
              if not body.outputs or tensor.name in binary_of]
    as_json = [tensor for tensor, _ in wanted if not binary_of.get(tensor.name, body.binary_default)]
    values = sum(int(np.prod([int(d) for d in tensor.shape])) for tensor in as_json)
    if values > MAX_JSON_OUTPUT_VALUES:
        names = ", ".join(tensor.name for tensor in as_json)
        raise Refused(400, f"the answer's JSON outputs ({names}) hold {values} values, more than {MAX_JSON_OUTPUT_VALUES}: "
                           f'ask for them as binary data ("parameters": {{"binary_data": true}} on each output, or '
                           f'"binary_data_output": true on the request)')
    header = dict(model_name=response.model_name, model_version=response.model_version, outputs=[])
    if body.id:
        header["id"] = body.id
    chunks = []
    for tensor, raw in wanted:
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


class BodyBudget:
    """Request body bytes held at once across all requests; a request that would pass `limit` is refused with 503.

    One per front, used from its event loop only. `hold()` is one request's share, given back when the request ends.
    """

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextlib.contextmanager
    def hold(self):
        share = BodyShare(self)
        try:
            yield share
        finally:
            self.held -= share.bytes


class BodyShare:
    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes = budget, 0

    def grow(self, total: int) -> None:
        """This request now holds `total` bytes; Refused(503) where all requests together would hold more than the limit."""
        if total <= self.bytes:
            return
        if self.budget.held + total - self.bytes > self.budget.limit:
            raise Refused(503, f"the server holds {self.budget.held} bytes of request bodies, and may hold {self.budget.limit}: "
                               "retry later")
        self.budget.held += total - self.bytes
        self.bytes = total


DIGITS = re.compile(r"[0-9]{1,15}")


def byte_count(value: str, header: str) -> int:
    """A header that counts bytes (ASCII digits only: int() also takes "²" and "٣"); BadRequest otherwise."""
    if not DIGITS.fullmatch(value):
        raise BadRequest(f"{header} must be a number of bytes, got {value[:40]!r}")
    return int(value)


async def read_body(receive_stream, headers, limit: int, share: BodyShare | None = None, stall_s: float | None = None,
                    min_rate: float | None = None) -> bytearray:
    """The request body, decompressed (gzip / deflate), at most `limit` bytes either way; Refused otherwise.

    `share`: this request's part of the bytes held across requests (503 past it); `stall_s`: the longest pause between
    two parts of the body, and with `min_rate` (bytes/s) the pace it must keep after its first `stall_s` (408 otherwise).
    """
    length = headers.get("content-length")
    if length is not None and byte_count(length, "Content-Length") > limit:
        raise Refused(413, f"the body is {length} bytes, more than {limit}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise Refused(415, f"Content-Encoding {encoding[:40]} is not supported (gzip, deflate or none)")
    inflate = zlib.decompressobj(31 if encoding == "gzip" else 15) if encoding != "identity" else None
    if share is not None and length is not None:
        share.grow(int(length))                                   # before reading: a body that cannot be held is not read
    body = bytearray()
    try:
        await _read_into(body, receive_stream, limit, inflate, encoding, share, stall_s, min_rate)
    except BaseException:
        del body[:]                     # the exception's traceback keeps this frame (in a cycle): not the bytes with it
        raise
    return body


async def _read_into(body: bytearray, receive_stream, limit, inflate, encoding, share, stall_s, min_rate) -> None:
    received = 0
    chunks = receive_stream.__aiter__()
    start = asyncio.get_running_loop().time()
    while True:
        wait = None
        if stall_s is not None:
            wait = stall_s
            if min_rate:
                wait = min(wait, start + stall_s + received / min_rate - asyncio.get_running_loop().time())
            if wait <= 0:
                raise Refused(408, f"the body came slower than {min_rate / 1024:g} KiB/s")
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            stalled = wait == stall_s
            raise Refused(408, f"no part of the body came for {stall_s:g} s" if stalled else
                               f"the body came slower than {min_rate / 1024:g} KiB/s") from None
        received += len(chunk)
        if inflate is not None:
            try:
                chunk = inflate.decompress(chunk, limit - len(body) + 1)
            except zlib.error:
                raise Refused(400, f"the body is not {encoding} data" + (" (a zlib stream, RFC 9110)" if encoding == "deflate" else "")) from None
            if inflate.unconsumed_tail:
                raise Refused(413, f"the body expands past {limit} bytes")
        if len(body) + len(chunk) > limit:
            raise Refused(413, f"the body is more than {limit} bytes")
        if share is not None:
            share.grow(len(body) + len(chunk))
        body += chunk
    if inflate is not None:
        try:
            tail = inflate.flush()
        except zlib.error:
            tail = b""
        if not inflate.eof:
            raise Refused(400, f"the {encoding} body is truncated or corrupt")
        if len(body) + len(tail) > limit:
            raise Refused(413, f"the body expands past {limit} bytes")
        body += tail

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
