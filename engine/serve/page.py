"""t2f-serve's page (static/index.html, with --web): faces that follow typing, over a WebSocket.

Each keystroke sends the whole text; per client only the newest pending message is kept, and
each message becomes one request to the t2f models through Triton (the same batcher as API
clients). Odd frames (binary, too big, not JSON, too deep) close the socket with a code. The
handshake's checks (Host, Origin, token) are the front's (web.py).

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
import importlib.resources
import json
import time

import numpy as np

from t2f.files import json_depth_exceeds

from .kserve import Forwarder, Input, Refused, encode_strings
from .protocol import IMAGE_MODEL, MAX_JSON_DEPTH, MAX_PROMPT_BYTES, MAX_SEED, TEXT_MODEL, TRUNCATION_RANGE, BadRequest, check_inputs

MAX_FRAME_BYTES = 64 * 1024          # A page message (JSON); larger ones close the socket (1009).


def page_html() -> str:
    return importlib.resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


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
# One page's socket.


async def converse(websocket, frames: Frames, say) -> None:
    """Answer an accepted WebSocket's messages, the newest first, until it closes; `say(what, message)` logs a refusal."""
    from starlette.websockets import WebSocketDisconnect

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
                say("WebSocket frame", result[1])
                with contextlib.suppress(Exception):
                    await websocket.close(code=result[0], reason=result[1][:120])
            elif isinstance(result, BaseException) and not isinstance(result, (WebSocketDisconnect, RuntimeError, OSError)):
                say("WebSocket", f"{type(result).__name__}: {' '.join(str(result).split())[:200]}")
                with contextlib.suppress(Exception):
                    await websocket.close(code=1011)
    finally:
        for task in tasks:
            task.cancel()
