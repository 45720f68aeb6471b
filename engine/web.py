"""The page of `t2f-serve --web`: a text box and a grid of faces that follows the typing.

One static page (engine/static/index.html, no build step) talks to this Starlette app over a
WebSocket. Each keystroke sends the whole text; per client only the newest pending message is
kept, so a slow frame never queues stale prompts behind it. Every frame is one request to the
same Triton models that API clients call (over Triton's HTTP endpoint), so browsers and API
clients share the batcher. Frames go back as raw RGB bytes: no image encoding on the page's path.

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
import threading
import time

import numpy as np

from .serve import IMAGE_MODEL, MAX_SEED, TEXT_MODEL, TRUNCATION_RANGE, Endpoints


def page_html() -> str:
    return importlib.resources.files("t2f.engine").joinpath("static/index.html").read_text(encoding="utf-8")


def triton_error(e: BaseException) -> str:
    """What to show for a failed frame: a refused request's message, or the last line of another error (without a traceback)."""
    message = e.message() if callable(getattr(e, "message", None)) else str(e)       # tritonclient's, without the status
    lines = [line.strip() for line in str(message).replace("\\n", "\n").splitlines() if line.strip()]
    named = [line for line in lines if "BadRequest:" in line or "Error:" in line]
    text = (named or lines or [type(e).__name__])[-1]
    return text.split("BadRequest: ", 1)[-1].removeprefix("bad request: ")


class Frames:
    """Calls the t2f models through Triton's HTTP endpoint, one request per frame."""

    def __init__(self, endpoints: Endpoints, max_count: int):
        self.endpoints, self.max_count = endpoints, max_count
        self.client = None

    async def open(self) -> None:
        import tritonclient.http.aio as httpclient

        self.client = httpclient.InferenceServerClient(self.endpoints.http_url, conn_timeout=600)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def _settings(self, message: dict) -> tuple[int, float, int]:
        seed, psi, count = int(message.get("seed", 0)), float(message.get("truncation", 0.7)), int(message.get("count", 4))
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}")
        if not TRUNCATION_RANGE[0] <= psi <= TRUNCATION_RANGE[1]:                 # NaN fails this too
            raise ValueError(f"truncation must be in [{TRUNCATION_RANGE[0]:g}, {TRUNCATION_RANGE[1]:g}]")
        if not 1 <= count <= self.max_count:
            raise ValueError(f"count must be in 1..{self.max_count}")
        return seed, psi, count

    async def infer(self, message: dict, last: np.ndarray | None) -> np.ndarray:
        """A message -> faces [count, H, W, 3] uint8: `count` samples of one seed (t2f-infer --n count)."""
        import tritonclient.http.aio as httpclient

        seed, psi, count = self._settings(message)
        if message.get("type") == "image":
            index = int(message.get("index", -1))
            if last is None or not 0 <= index < len(last):
                raise ValueError("no such face to start from")
            model, first = IMAGE_MODEL, httpclient.InferInput("image", [count, *last.shape[1:]], "UINT8")
            first.set_data_from_numpy(np.repeat(last[index : index + 1], count, axis=0))
        else:
            model, first = TEXT_MODEL, httpclient.InferInput("prompt", [count, 1], "BYTES")
            first.set_data_from_numpy(np.full([count, 1], str(message.get("prompt", "")).encode("utf-8"), dtype=object))
        columns = [("seed", "INT64", np.full([count, 1], seed, np.int64)), ("truncation", "FP32", np.full([count, 1], psi, np.float32)),
                   ("sample", "INT64", np.arange(count, dtype=np.int64).reshape(count, 1))]
        inputs = [first]
        for name, dtype, value in columns:
            inputs.append(httpclient.InferInput(name, list(value.shape), dtype))
            inputs[-1].set_data_from_numpy(value)
        result = await self.client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput("image", binary_data=True)])
        return result.as_numpy("image")


def create_app(endpoints: Endpoints, max_count: int = 16):
    """The Starlette app: GET / (the page), GET /config, and the WebSocket /ws."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    frames = Frames(endpoints, max_count)
    html = page_html()

    async def index(request):
        return HTMLResponse(html)

    async def config(request):
        return JSONResponse(dict(max_count=max_count, max_seed=MAX_SEED, truncation=list(TRUNCATION_RANGE)))

    async def socket(websocket):
        await websocket.accept()
        newest: dict = {}                 # the newest message not yet answered (older ones are dropped)
        arrived = asyncio.Event()

        async def receive():
            while True:
                text = await websocket.receive_text()
                try:
                    message = json.loads(text)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    newest["message"] = message
                    arrived.set()

        async def answer():
            last = None
            while True:
                await arrived.wait()
                arrived.clear()
                message = newest.pop("message")
                start = time.perf_counter()
                try:
                    faces = await frames.infer(message, last)
                except Exception as e:  # a refused request or Triton's error: tell this page, keep serving
                    await websocket.send_text(json.dumps(dict(type="error", id=message.get("id"), message=triton_error(e))))
                    continue
                last = faces
                header = dict(type="frame", id=message.get("id"), count=int(faces.shape[0]), height=int(faces.shape[1]),
                              width=int(faces.shape[2]), server_ms=round((time.perf_counter() - start) * 1000, 2),
                              label=str(message.get("prompt", "")) if message.get("type") != "image" else f"like face {message.get('index')}")
                await websocket.send_text(json.dumps(header))
                await websocket.send_bytes(np.ascontiguousarray(faces).tobytes())

        tasks = [asyncio.ensure_future(receive()), asyncio.ensure_future(answer())]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None and not isinstance(task.exception(), WebSocketDisconnect):
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await frames.open()
        yield
        await frames.close()

    return Starlette(routes=[Route("/", index), Route("/config", config), WebSocketRoute("/ws", socket)], lifespan=lifespan)


class WebPage:
    """uvicorn serving the app on a thread of its own (t2f-serve's main thread waits for signals)."""

    def __init__(self, endpoints: Endpoints, host: str = "127.0.0.1", port: int = 8080, max_count: int = 16):
        import uvicorn

        config = uvicorn.Config(create_app(endpoints, max_count), host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="t2f-web", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the page's server did not start on port {self.server.config.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
