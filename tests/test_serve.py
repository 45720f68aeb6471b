"""t2f-serve: the real Triton Inference Server (a static model repository) on 127.0.0.1 with the tiny models,
called through t2f's HTTP front, Triton's gRPC and a browser; and crafted requests (docs/serving.md, Security).

Results are compared with the direct pipeline at the same --batch bit for bit (the default, 1 on the CPU; and 4):
the graphs run on fixed blocks of --batch rows, so a row does not depend on the requests the
batcher merged it with (test_engine.test_a_rows_result_does_not_depend_on_the_rows_beside_it).
Crafted requests are answered with a 4xx, and the next good request gets the same bytes as before.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.slow     # Triton servers: minutes; the README's `pytest` runs it, `-m "not slow"` leaves it out

httpclient = pytest.importorskip("tritonclient.http", reason='t2f-serve tests need tritonclient: pip install -e ".[serve]"')
grpcclient = pytest.importorskip("tritonclient.grpc", reason='t2f-serve tests need tritonclient: pip install -e ".[serve]"')
pytest.importorskip("pytriton", reason='t2f-serve\'s default tritonserver comes with nvidia-pytriton: pip install -e ".[serve]"')
from tritonclient.utils import InferenceServerException  # noqa: E402

from helpers import TINY, free_port, http_request as request, tiny_pipeline  # noqa: E402
from t2f.engine.pipeline import face_tensor  # noqa: E402
from t2f.engine.serve.protocol import MAX_SAMPLE  # noqa: E402

MAX_BATCH = 16
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "test-token-0123456789abcdef"


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


class Running:
    """A t2f-serve process on free ports."""

    def __init__(self, cache, web: bool, extra=(), devices=("cpu",), max_batch=MAX_BATCH, ports=None, wait=True, wrap=(), env=None):
        self.http, self.grpc, self.metrics = ports or (free_port(), free_port(), free_port())
        self.cache = str(cache)
        args = [*wrap, sys.executable, "-m", "t2f.engine.serve", *TINY, *[a for d in devices for a in ("--device", d)], "--max-batch", str(max_batch),
                "--cache", self.cache,
                "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *extra]
        if web:
            args += ["--web"]
        self.args = args
        self.shm_before = set(os.listdir("/dev/shm"))
        self.tmp_before = set(os.listdir(tempfile.gettempdir()))
        env = dict(os.environ, T2F_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.log_path = os.path.join(self.cache, f"serve-{len([n for n in os.listdir(self.cache) if n.startswith('serve-')])}.log")
        self.log = open(self.log_path, "a")                                 # one log per server started on this cache
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if wait:
            self.wait_for("ready; Ctrl-C to stop")

    def wait_for(self, text: str, count: int = 1, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while self.output().count(text) < count:                        # both models loaded, and the front up
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"t2f-serve did not start:\n{self.output()}")
            time.sleep(0.5)

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, group: bool = False) -> int:
        """Signal the server (group: its whole process group, as Ctrl-C in a terminal does) and wait for it."""
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.final_output = self.output()
            self.log.close()

    def leftovers(self) -> list[str]:
        """Processes, shared memory and workspace files this server left behind (after up to 20 s to go)."""
        deadline = time.monotonic() + 20
        while (found := self._leftovers()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return found

    def _leftovers(self) -> list[str]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if os.path.join(self.cache, "serve") in cmdline:          # tritonserver and its stubs name the repository
                    found.append(f"process {entry}: {cmdline[:120]}")
        found += [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if name.startswith("t2f") and name not in self.shm_before]
        serve_dir = os.path.join(self.cache, "serve")
        found += [os.path.join(serve_dir, name) for name in (os.listdir(serve_dir) if os.path.isdir(serve_dir) else [])]
        found += [name for name in os.listdir(tempfile.gettempdir()) if name.startswith("folder") and name not in self.tmp_before]
        return found

    def workspace_path(self) -> str:
        serve_dir = os.path.join(self.cache, "serve")
        (name,) = [n for n in os.listdir(serve_dir) if n.startswith(f"{self.process.pid}-")]
        return os.path.join(serve_dir, name)

    def workspace(self) -> dict:
        """The live server's workspace.json (its pid and shared-memory prefix)."""
        with open(os.path.join(self.workspace_path(), "workspace.json")) as f:
            return json.load(f)

    @property
    def grpc_url(self) -> str:
        """Triton's gRPC: its Unix socket in the workspace, or with --grpc-host its TCP port."""
        return f"127.0.0.1:{self.grpc}" if "--grpc-host" in self.args else f"unix:{self.workspace_path()}/grpc:0"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Running(tmp_path_factory.mktemp("serve"), web=True, extra=["--queue-delay-us", "5000", "--allow-origin", "http://allowed.example"])
    yield running
    assert running.stop(signal.SIGTERM) == 0, running.final_output
    assert not running.leftovers()


def defaults_pipeline(batch_size):
    """t2f-infer's defaults (backend and precision auto), as the server's: the same choice is made on both sides."""
    from t2f.engine import load_pipeline

    return load_pipeline(generator="tiny", clip="tiny", mapper="tiny", device="cpu", backend="auto", precision="auto",
                         batch_size=batch_size)


@pytest.fixture(scope="module")
def direct():
    return defaults_pipeline(batch_size=None)      # t2f-infer's default --batch, as the server's (1 on the CPU)


@pytest.fixture(scope="module")
def direct4():
    return tiny_pipeline(batch_size=4)             # t2f-infer --backend torch --precision fp32 --batch 4: the two-instance server's


def text_inputs(module, prompts, seeds, truncations, samples=None, noise_mode=None):
    rows = len(prompts)
    values = [("prompt", "BYTES", np.array([[p.encode() if isinstance(p, str) else p] for p in prompts], dtype=object)),
              ("seed", "INT64", np.array(seeds, dtype=np.int64).reshape(rows, 1)),
              ("truncation", "FP32", np.array(truncations, dtype=np.float32).reshape(rows, 1))]
    if samples is not None:
        values.append(("sample", "INT64", np.array(samples, dtype=np.int64).reshape(rows, 1)))
    if noise_mode is not None:
        values.append(("noise_mode", "BYTES", np.array([[noise_mode.encode()]] * rows, dtype=object)))
    inputs = []
    for name, dtype, value in values:
        inputs.append(module.InferInput(name, list(value.shape), dtype))
        inputs[-1].set_data_from_numpy(value)
    return inputs


def assert_same(image, ws, faces, index):
    """A served row against image `index` of a direct call at the same --batch: bit for bit."""
    assert image.shape == tuple(faces.images.shape[1:]) and image.dtype == np.uint8 and ws.dtype == np.float32
    assert np.array_equal(ws, faces.ws[index].numpy()) and np.array_equal(image, faces.images[index].numpy())


ROWS = dict(prompts=["a smiling woman", "an old man with a beard", "a smiling woman"], seeds=[0, 7, 3], truncations=[0.7, 1.0, 0.5],
            samples=[0, 2, 1])


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_served_faces_match_the_direct_pipeline(server, direct, module):
    url = f"127.0.0.1:{server.http}" if module is httpclient else server.grpc_url
    with module.InferenceServerClient(url) as client:
        assert client.is_server_ready() and client.is_model_ready("t2f") and client.is_model_ready("t2f_image")
        result = client.infer("t2f", text_inputs(module, **ROWS))
        images, ws = result.as_numpy("image"), result.as_numpy("ws")
        assert images.shape[0] == 3
        for r in range(3):   # row r is image `sample` of t2f-infer PROMPT --n sample+1 --seed SEED --truncation PSI
            faces = direct([ROWS["prompts"][r]], n=ROWS["samples"][r] + 1, seed=ROWS["seeds"][r], truncation_psi=ROWS["truncations"][r])
            assert_same(images[r], ws[r], faces, ROWS["samples"][r])
        assert not np.array_equal(images[0], images[2])                    # same prompt, other seed and sample
        # The default backend (auto: exported graphs here) holds constant noise: noise_mode random is refused in one
        # line that says how to get it (the two-instance server below runs --backend torch and serves it).
        with pytest.raises(InferenceServerException, match="noise_mode random needs t2f-serve --backend torch"):
            client.infer("t2f", text_inputs(module, ["a child"], [5], [0.8], noise_mode="random"))
        assert client.is_model_ready("t2f")


def test_image_model_is_t2f_infer_image_mode(server, direct):
    face = direct(["a smiling woman"], n=1, seed=1, truncation_psi=0.7).images[0].numpy()       # [H, W, 3] uint8
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.http}") as client:
        inputs = [httpclient.InferInput("image", [2, *face.shape], "UINT8")]
        inputs[0].set_data_from_numpy(np.stack([face, face]))
        inputs += text_inputs(httpclient, ["x", "x"], [4, 4], [0.7, 0.7], samples=[0, 1])[1:]
        result = client.infer("t2f_image", inputs)
        four_channels = httpclient.InferInput("image", [1, 8, 8, 4], "UINT8")
        four_channels.set_data_from_numpy(np.zeros([1, 8, 8, 4], np.uint8))
        with pytest.raises(InferenceServerException, match="(?i)shape"):
            client.infer("t2f_image", [four_channels] + text_inputs(httpclient, ["x"], [4], [0.7])[1:])
        assert client.is_model_ready("t2f_image")
    faces = direct(["face"], n=2, seed=4, truncation_psi=0.7, mode="image", images=face_tensor(face)[None])
    for r in range(2):
        assert_same(result.as_numpy("image")[r], result.as_numpy("ws")[r], faces, r)


def _metrics(server, *names: str) -> list[int]:
    """Triton's Prometheus counters `names` of model t2f (summed over their other labels, such as a failure's reason)."""
    text = get(f"http://127.0.0.1:{server.metrics}/metrics")[1].decode()
    values = [[int(v) for labels, v in re.findall(rf'^{name}\{{([^}}]*)\}} (\d+)$', text, re.M) if 'model="t2f"' in labels.split(",")]
              for name in names]
    assert all(values), f"no {names} for model t2f in Triton's metrics"
    return [sum(v) for v in values]


def _counts(server) -> tuple[int, int]:
    """(rows inferred, model executions) of model t2f."""
    return tuple(_metrics(server, "nv_inference_count", "nv_inference_exec_count"))


def test_concurrent_requests_are_batched_and_each_is_right(server, direct):
    # 64 different requests: 16 prompts, each with its own seed and truncation, samples 0..3.
    jobs = [(f"face number {k}", 100 + k, 0.5 + (k % 5) * 0.1, j) for k in range(16) for j in range(4)]
    rows_before, executions_before = _counts(server)

    def call(chunk):
        with httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", connection_timeout=300, network_timeout=300) as client:
            out = []
            for prompt, seed, psi, sample in chunk:
                result = client.infer("t2f", text_inputs(httpclient, [prompt], [seed], [psi], samples=[sample]))
                out.append((result.as_numpy("image")[0], result.as_numpy("ws")[0]))
            return out

    with concurrent.futures.ThreadPoolExecutor(16) as pool:                     # 16 threads x 4 requests
        chunks = [jobs[t::16] for t in range(16)]
        answers = dict(zip([job for chunk in chunks for job in chunk], [a for c in pool.map(call, chunks) for a in c]))
    assert len(answers) == 64
    for k in range(16):                                              # t2f-infer PROMPT --n 4 --seed SEED --truncation PSI
        prompt, seed, psi, _ = jobs[4 * k]
        faces = direct([prompt], n=4, seed=seed, truncation_psi=psi)
        for j in range(4):
            assert_same(*answers[(prompt, seed, psi, j)], faces, j)
    rows_after, executions_after = _counts(server)
    assert rows_after - rows_before == 64
    assert executions_after - executions_before < 64                 # some execution took a batch of more than one request


BAD_TEXT = [
    (dict(prompts=[""]), "prompt is empty"),
    (dict(prompts=["   "]), "prompt is empty"),
    (dict(prompts=["face " * 100]), "prompt is too long"),
    (dict(prompts=["x" * 5000]), "prompt is too long"),
    (dict(prompts=[b"\xff\xfe"]), "not UTF-8"),
    (dict(truncations=[float("nan")]), "truncation must be a finite number"),
    (dict(truncations=[5.0]), "truncation must be a finite number"),
    (dict(seeds=[-1]), "seed must be in"),
    (dict(samples=[MAX_SAMPLE + 1]), "sample must be in"),
    (dict(noise_mode="loud"), "noise_mode must be one of"),
]


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_bad_requests_are_refused_by_name_and_the_server_goes_on(server, direct, module):
    url = f"127.0.0.1:{server.http}" if module is httpclient else server.grpc_url
    with module.InferenceServerClient(url) as client:
        for change, message in BAD_TEXT:
            args = {**dict(prompts=["a smiling woman"], seeds=[0], truncations=[0.7]), **change}
            with pytest.raises(InferenceServerException, match=re.escape(message)):
                client.infer("t2f", text_inputs(module, **args))
        good = text_inputs(module, ["a"], [0], [0.7])
        # Checked by Triton itself: dtype, shape, missing inputs, too many rows.
        wrong_dtype = module.InferInput("seed", [1, 1], "FP32")
        wrong_dtype.set_data_from_numpy(np.zeros([1, 1], np.float32))
        with pytest.raises(InferenceServerException, match="seed.*data-type"):
            client.infer("t2f", [good[0], wrong_dtype, good[2]])
        wrong_shape = module.InferInput("truncation", [1, 2], "FP32")
        wrong_shape.set_data_from_numpy(np.zeros([1, 2], np.float32))
        with pytest.raises(InferenceServerException, match="(?i)shape"):
            client.infer("t2f", [good[0], good[1], wrong_shape])
        with pytest.raises(InferenceServerException, match="(?i)seed"):
            client.infer("t2f", [good[0], good[2]])
        many = MAX_BATCH + 1
        with pytest.raises(InferenceServerException, match="(?i)batch"):
            client.infer("t2f", text_inputs(module, ["a"] * many, [0] * many, [0.7] * many))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("t2f")
        result = client.infer("t2f", good)
    assert_same(result.as_numpy("image")[0], result.as_numpy("ws")[0], direct(["a"], n=1, seed=0, truncation_psi=0.7), 0)


def test_the_page_keeps_only_the_newest_prompt(server):
    websockets = pytest.importorskip("websockets.sync.client", reason="needs websockets")
    with websockets.connect(f"ws://127.0.0.1:{server.http}/ws", max_size=None) as ws:
        prompts = [f"a face {'x' * k}" for k in range(1, 21)]
        for k, prompt in enumerate(prompts):                        # typing: one message per keystroke
            ws.send(json.dumps(dict(type="text", id=k, prompt=prompt, seed=0, truncation=0.7, count=2)))
        frames = []
        while not frames or frames[-1]["label"] != prompts[-1]:
            header = json.loads(ws.recv(timeout=60))
            assert header["type"] == "frame", header
            pixels = ws.recv(timeout=60)
            assert len(pixels) == header["count"] * header["height"] * header["width"] * 3
            frames.append(header)
        assert len(frames) < len(prompts)                            # stale prompts were dropped, not queued
        ws.send(json.dumps(dict(type="text", id=99, prompt="a face", seed=0, truncation=float("nan"))))
        error = json.loads(ws.recv(timeout=60))
        assert error["type"] == "error" and "truncation" in error["message"]
        ws.send(json.dumps(dict(type="text", id=100, prompt="face " * 100, seed=0, truncation=0.7, count=2)))   # refused by the model
        error = json.loads(ws.recv(timeout=60))
        assert error["type"] == "error" and error["id"] == 100 and error["message"].startswith("prompt is too long: "), error


def _canvas_pixels(page, index: int) -> np.ndarray:
    data = page.evaluate("""(i) => { const c = document.querySelectorAll('#grid canvas')[i];
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""", index)
    side = int(round((len(data) // 4) ** 0.5))
    return np.array(data, dtype=np.uint8).reshape(side, side, 4)[..., :3]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_browser_faces_follow_typing(server, direct, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport=dict(width=1000, height=800))
            page.goto(f"http://127.0.0.1:{server.http}/")
            page.fill("#seed", "3")
            page.locator("#prompt").press_sequentially("a smiling woman", delay=20)
            page.wait_for_function("document.getElementById('grid').dataset.label === 'a smiling woman'", timeout=60_000)
            first = [_canvas_pixels(page, i) for i in range(4)]
            expected = direct(["a smiling woman"], n=4, seed=3, truncation_psi=0.7).images.numpy()
            for i in range(4):                                       # the page shows t2f-infer --n 4 --seed 3
                assert np.array_equal(first[i], expected[i])
            page.locator("#prompt").press_sequentially(" with red hair", delay=20)
            page.wait_for_function("document.getElementById('grid').dataset.label === 'a smiling woman with red hair'", timeout=60_000)
            assert not np.array_equal(_canvas_pixels(page, 0), first[0])
            assert re.search(r"last frame \d+ ms", page.inner_text("#status"))
            page.locator("#grid canvas").nth(1).click()                  # more faces like face 1
            page.wait_for_function("document.getElementById('grid').dataset.label === 'like face 1'", timeout=60_000)
            with page.expect_download() as download:
                page.click("#download")
            assert download.value.suggested_filename.endswith(".png")
            shot = os.environ.get("T2F_SCREENSHOT") or str(tmp_path / "page.png")
            page.screenshot(path=shot)
            assert os.path.getsize(shot) > 0
        finally:
            browser.close()


# ----------------------------------------------------------------------------
# Crafted requests, each refused in one line (a 4xx), and the next good request answered as before.


GOOD_BODY = json.dumps(dict(inputs=[dict(name="prompt", datatype="BYTES", shape=[2, 1], data=["a smiling woman", "an old man"]),
                                    dict(name="seed", datatype="INT64", shape=[2, 1], data=[3, 4]),
                                    dict(name="truncation", datatype="FP32", shape=[2, 1], data=[0.7, 0.5])],
                            parameters=dict(binary_data_output=True))).encode()


@pytest.fixture(scope="module")
def good_answer(server):
    status, body = request(server.http, "POST", "/v2/models/t2f/infer", GOOD_BODY)
    assert status == 200 and b'"binary_data_size"' in body
    return body


def _seed_shape(shape) -> bytes:
    return json.dumps(dict(inputs=[dict(name="prompt", datatype="BYTES", shape=[1, 1], data=["a"]),
                                   dict(name="seed", datatype="INT64", shape=shape, data=[0]),
                                   dict(name="truncation", datatype="FP32", shape=[1, 1], data=[0.7])])).encode()


def _gzip_bomb(size: int = 2**30) -> bytes:
    packer, zeros = zlib.compressobj(9, zlib.DEFLATED, 31), bytes(16 * 2**20)
    return b"".join(packer.compress(zeros) for _ in range(size // len(zeros))) + packer.flush()


def _face_body(shape) -> tuple[bytes, dict]:
    rows = shape[0]
    header = json.dumps(dict(inputs=[dict(name="image", datatype="UINT8", shape=shape, parameters=dict(binary_data_size=int(np.prod(shape)))),
                                     dict(name="seed", datatype="INT64", shape=[rows, 1], data=[0] * rows),
                                     dict(name="truncation", datatype="FP32", shape=[rows, 1], data=[0.7] * rows)])).encode()
    return header + bytes(int(np.prod(shape))), {"Inference-Header-Content-Length": str(len(header))}


CRAFTED = {   # case number and name: (path, body, headers, status, message)
    "1-shape-2^40-rows": lambda: ("t2f", _seed_shape([1099511627776, 1]), {}, 400, "seed has 1099511627776 rows, the other inputs 1"),
    "1-shape-2^62-rows": lambda: ("t2f", _seed_shape([2**62, 1]), {}, 400, f"seed has {2**62} rows, the other inputs 1"),
    "1-shape-2^62-wide": lambda: ("t2f", _seed_shape([1, 2**62]), {}, 400, "expects [rows, 1]"),
    "2-nested-300000": lambda: ("t2f", b"[" * 300_000, {}, 400, "nests deeper than 16"),
    "2-nested-100000": lambda: ("t2f", b"[" * 100_000, {}, 400, "nests deeper than 16"),
    "4-gzip-1GiB": lambda: ("t2f", _gzip_bomb(), {"Content-Encoding": "gzip"}, 413, "expands past"),
    "4-body-200MB": lambda: ("t2f", b"{" + b" " * 1000, {"Content-Length": str(200 * 2**20)}, 413, "more than"),
    "4-brotli": lambda: ("t2f", b"x", {"Content-Encoding": "br"}, 415, "not supported"),
    "5-faces-8x4096x4096": lambda: ("t2f_image", *_face_body([1, 16, 16, 3])[:1], {"Content-Length": str(8 * 4096 * 4096 * 3 + 500)}, 413, "more than"),
    "5-face-side-1025": lambda: ("t2f_image", *_face_body([1, 1025, 8, 3]), 400, "image sides must be 1..1024"),
    "9-zero-size-face": lambda: ("t2f_image", *_face_body([1, 0, 0, 3]), 400, "image sides must be 1..1024, got 0 x 0"),
    "repository-load": lambda: ("/v2/repository/models/t2f/load", b"{}", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_requests_get_a_4xx_and_the_next_good_request_the_same_bytes(server, good_answer, case):
    model, body, headers, status, message = CRAFTED[case]()
    path = model if model.startswith("/") else f"/v2/models/{model}/infer"
    got, text = request(server.http, "POST", path, body, headers)   # a Content-Length over the limit: refused before reading
    assert got == status and message in text.decode(), (got, text[:300])
    assert b"Traceback" not in text and text.count(b"\n") <= 1
    again = request(server.http, "POST", "/v2/models/t2f/infer", GOOD_BODY)
    assert again == (200, good_answer)                   # the server stayed up, and answers byte for byte as before
    assert "Traceback" not in server.output()


def test_crafted_shapes_over_grpc_are_refused_and_a_zero_face_in_one_line(server, good_answer):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for shape in ([1099511627776, 1], [2**62, 1], [1, 2**62]):
            seed = grpcclient.InferInput("seed", shape, "INT64")
            seed._raw_content = b"\0" * 8                                  # a shape that claims far more than it carries
            good = text_inputs(grpcclient, ["a"], [0], [0.7])
            with pytest.raises(InferenceServerException):
                client.infer("t2f", [good[0], seed, good[2]])
        face = grpcclient.InferInput("image", [1, 0, 0, 3], "UINT8")        # case 9 straight to Triton: the model refuses it
        face.set_data_from_numpy(np.zeros([1, 0, 0, 3], np.uint8))
        with pytest.raises(InferenceServerException) as info:
            client.infer("t2f_image", [face] + text_inputs(grpcclient, ["x"], [0], [0.7])[1:])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "image sides must be 1..1024, got 0 x 0" in str(info.value)
        assert "Traceback" not in str(info.value) and "\n" not in str(info.value)
        for call in (lambda: client.load_model("t2f"), lambda: client.unload_model("t2f")):            # case 3: no load API
            with pytest.raises(InferenceServerException, match="not allowed"):
                call()
        assert client.is_model_ready("t2f") and client.is_model_ready("t2f_image")
    assert request(server.http, "POST", "/v2/models/t2f/infer", GOOD_BODY) == (200, good_answer)


def _cmdlines_of(root_pid: int) -> dict[int, bytes]:
    """Command lines of `root_pid` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[pid] = f.read()
        except OSError:
            continue
        todo += children.get(pid, [])
    return found


def test_no_secret_on_a_command_line_and_no_repository_route(two_instances):
    cmdlines = _cmdlines_of(two_instances.process.pid)
    assert len(cmdlines) >= 4, cmdlines                       # t2f-serve, tritonserver, a stub per model instance
    assert any(b"tritonserver" in c and b"--model-control-mode\0none" in c for c in cmdlines.values())
    assert not [c for c in cmdlines.values() if TOKEN.encode() in c or b"access-token" in c or b"restricted" in c]
    for path in ("/v2/repository/index", "/v2/repository/models/t2f/load", "/v2/repository/models/t2f/unload"):
        assert request(two_instances.http, "POST", path, b"{}", AUTH)[0] == 404


def test_the_token_guards_everything_but_health(two_instances):
    status, text = request(two_instances.http, "POST", "/v2/models/t2f/infer", GOOD_BODY)
    assert status == 401 and b"Bearer" in text
    assert request(two_instances.http, "POST", "/v2/models/t2f/infer", GOOD_BODY, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
    assert request(two_instances.http, "GET", "/v2/models/t2f")[0] == 401
    assert request(two_instances.http, "GET", "/v2/health/ready")[0] == 200
    assert request(two_instances.http, "POST", "/v2/models/t2f/infer", GOOD_BODY, AUTH)[0] == 200
    five = json.dumps(dict(inputs=[dict(name="prompt", datatype="BYTES", shape=[5, 1], data=["a"] * 5),
                                   dict(name="seed", datatype="INT64", shape=[5, 1], data=[0] * 5),
                                   dict(name="truncation", datatype="FP32", shape=[5, 1], data=[0.7] * 5)])).encode()
    status, text = request(two_instances.http, "POST", "/v2/models/t2f/infer", five, AUTH)
    assert status == 400 and b"5 rows; a request takes 1..4" in text             # through the token: the checks still hold
    with httpclient.InferenceServerClient(f"127.0.0.1:{two_instances.http}") as client:
        assert client.is_model_ready("t2f", headers=AUTH)
        assert not client.is_model_ready("t2f")                                  # 401: not ready for this client


def _shm_regions(prefix: str) -> dict[str, os.stat_result]:
    return {name: os.stat(f"/dev/shm/{name}") for name in os.listdir("/dev/shm") if name.startswith(prefix)}


def _stub_rss_mib(server) -> list[float]:
    rss = []
    for pid, cmdline in _cmdlines_of(server.process.pid).items():
        if b"triton_python_backend_stub" in cmdline:
            with open(f"/proc/{pid}/status") as f:
                rss += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")]
    return rss


def test_shared_memory_is_private_and_one_big_request_does_not_pin_more(server, direct, capsys):
    prefix = server.workspace()["shm_prefix"]
    regions = _shm_regions(prefix)
    assert len(regions) == 2, regions                              # one per model instance
    assert all(info.st_mode & 0o777 == 0o600 and info.st_uid == os.getuid() for info in regions.values())   # case 7
    if os.getuid() == 0:                                           # as another user: the regions cannot be opened
        path = f"/dev/shm/{next(iter(regions))}"
        probe = subprocess.run([sys.executable, "-c", f"import os; os.setgid(65534); os.setuid(65534); open({path!r}, 'rb')"],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
    # Case 5: the largest request the front lets through (16 faces of 1024 x 1024: 48 MiB), twice.
    face = direct(["a smiling woman"], n=1, seed=1, truncation_psi=0.7).images[0].numpy()
    big = np.ascontiguousarray(np.broadcast_to(np.kron(face, np.ones([16, 16, 1], np.uint8))[None], [16, 1024, 1024, 3]))
    sizes, rss_before = [], _stub_rss_mib(server)
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=600, connection_timeout=600) as client:
        for _ in range(2):
            inputs = [httpclient.InferInput("image", list(big.shape), "UINT8")]
            inputs[0].set_data_from_numpy(big)
            inputs += text_inputs(httpclient, ["x"] * 16, [4] * 16, [0.7] * 16)[1:]
            assert client.infer("t2f_image", inputs).as_numpy("image").shape[0] == 16
            sizes.append(sum(info.st_blocks * 512 for info in _shm_regions(prefix).values()))
    assert sizes[1] <= sizes[0] and sizes[0] < 256 * 2**20, sizes           # reused, not grown again; bounded by the limits
    with capsys.disabled():
        print(f"\nshared memory after a 48 MiB request: {sizes[0] / 2**20:.0f} MiB, after a second {sizes[1] / 2**20:.0f} MiB; "
              f"stub RSS {[round(r) for r in rss_before]} MiB before, {[round(r) for r in _stub_rss_mib(server)]} MiB after")


def test_cross_site_websockets_and_foreign_hosts_are_refused(server):
    websockets = pytest.importorskip("websockets.sync.client", reason="needs websockets")
    from websockets.exceptions import InvalidStatus

    url = f"ws://127.0.0.1:{server.http}/ws"
    for headers in ({"Origin": "http://evil.example"}, {"Origin": f"http://127.0.0.1:{server.http + 1}"}):   # case 6
        with pytest.raises(InvalidStatus) as info:
            websockets.connect(url, additional_headers=headers).close()
        assert info.value.response.status_code == 403
    with websockets.connect(url, additional_headers={"Origin": "http://allowed.example"}) as ws:    # --allow-origin
        ws.send(json.dumps(dict(type="text", id=1, prompt="a face", seed=0, truncation=0.7, count=1)))
        assert json.loads(ws.recv(timeout=60))["type"] == "frame"
    with websockets.connect(url, additional_headers={"Origin": f"http://127.0.0.1:{server.http}"}) as ws:   # the page's own
        ws.send(json.dumps(dict(type="text", id=1, prompt="a face", seed=0, truncation=0.7, count=1)))
        assert json.loads(ws.recv(timeout=60))["type"] == "frame"
    assert request(server.http, "GET", "/", headers={"Host": "rebound.example"})[0] == 421                 # DNS rebinding
    assert request(server.http, "GET", "/", headers={"Host": f"localhost:{server.http}"})[0] == 200


@pytest.mark.parametrize("frame, code", [(b"\x00\x01", 1003), ("[" * 10_000, 1007), ("[" * 100_000, 1009), ("not json", 1007),
                                         ("[1, 2]", 1007)], ids=["binary", "nested-10000", "nested-100000", "not-json", "not-object"])
def test_odd_websocket_frames_close_with_a_code(server, frame, code):
    websockets = pytest.importorskip("websockets.sync.client", reason="needs websockets")
    from websockets.exceptions import ConnectionClosed

    before = server.output()
    with websockets.connect(f"ws://127.0.0.1:{server.http}/ws") as ws:                                   # case 11
        ws.send(frame)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=60)
    assert info.value.rcvd is not None and info.value.rcvd.code == code, info.value
    assert "Traceback" not in server.output()[len(before):]
    with websockets.connect(f"ws://127.0.0.1:{server.http}/ws") as ws:
        ws.send(json.dumps(dict(type="text", id=2, prompt="a face", seed=0, truncation=0.7, count=1)))
        assert json.loads(ws.recv(timeout=60))["type"] == "frame"


def test_a_second_server_on_the_same_ports_says_so_and_leaves_nothing(server, good_answer, tmp_path):
    second = Running(tmp_path, web=True, ports=(server.http, server.grpc, server.metrics), wait=False)       # case 8
    assert second.process.wait(timeout=120) == 1
    output = second.output()
    assert "Traceback" not in output and output.strip().splitlines()[-1] == \
        f"Error: port {server.http} on 127.0.0.1 is in use (--http-port): Address already in use", output
    second.log.close()
    assert not second.leftovers()
    (tmp_path / "grpc").mkdir()
    with socket.socket() as taken:                                       # Triton's gRPC port, where --grpc-host asks for one
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        third = Running(tmp_path / "grpc", web=False, ports=(free_port(), port, free_port()), extra=["--grpc-host", "127.0.0.1"], wait=False)
        assert third.process.wait(timeout=120) == 1
    assert f"Error: port {port} on 127.0.0.1 is in use (--grpc-port)" in third.output() and "Traceback" not in third.output()
    third.log.close()
    assert not third.leftovers()
    assert request(server.http, "POST", "/v2/models/t2f/infer", GOOD_BODY) == (200, good_answer)


def test_triton_dying_is_restarted_and_kill_9_then_a_start_leaves_nothing(tmp_path):
    first = Running(tmp_path, web=False)
    body = request(first.http, "POST", "/v2/models/t2f/infer", GOOD_BODY)
    assert body[0] == 200
    (triton,) = [pid for pid, c in _cmdlines_of(first.process.pid).items() if c.split(b"\0")[0].endswith(b"tritonserver")]
    os.kill(triton, signal.SIGKILL)                                             # Triton dies (as on bad_alloc)
    first.wait_for("ready again", timeout_s=240)
    assert re.search(r"\nTriton Inference Server was killed by SIGKILL[^\n]*; restarting\nready again\n", first.output())
    assert request(first.http, "POST", "/v2/models/t2f/infer", GOOD_BODY) == body
    os.kill(first.process.pid, signal.SIGKILL)                                  # case 10: t2f-serve itself, kill -9
    first.process.wait(timeout=60)
    first.log.close()
    stale = os.listdir(os.path.join(str(tmp_path), "serve"))
    assert len(stale) == 1                                                       # its workspace (and shared memory) are left
    second = Running(tmp_path, web=False)
    assert not _processes_naming(os.path.join(str(tmp_path), "serve", stale[0]))  # the next start ended what was left of it
    second.shm_before, second.tmp_before = first.shm_before, first.tmp_before
    assert f"removed 1 workspace(s) of stopped servers: {stale[0]}" in second.output()
    assert request(second.http, "POST", "/v2/models/t2f/infer", GOOD_BODY) == body
    assert second.stop(signal.SIGINT, group=True) == 0, second.final_output       # Ctrl-C in a terminal
    assert "stopped" in second.final_output and "Traceback" not in second.final_output
    assert not second.leftovers()


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_the_written_repository_is_the_served_one(server, tmp_path):
    from click.testing import CliRunner

    from t2f.engine.serve import main

    out = tmp_path / "repository"
    result = CliRunner().invoke(main, [*TINY, "--device", "cpu", "--max-batch", str(MAX_BATCH), "--queue-delay-us", "5000",
                                       "--cache", server.cache, "--write-repository", str(out)])
    assert result.exit_code == 0, result.output
    served = os.path.join(server.cache, "serve", [n for n in os.listdir(os.path.join(server.cache, "serve"))][0], "repository")
    for relative in ("t2f/config.pbtxt", "t2f/1/model.py", "t2f_image/config.pbtxt", "t2f_image/1/model.py"):
        with open(out / relative, "rb") as a, open(os.path.join(served, relative), "rb") as b:
            assert a.read() == b.read(), relative
    assert "--model-control-mode none" in result.output


def _listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its sockets' inodes in /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:                 # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _as_another_user(code: str) -> subprocess.CompletedProcess:
    """Python `code` run as uid/gid 65534 (nobody) with the system's python3; skips where that cannot be done."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.getuid() != 0 or not shutil.which("setpriv") or python is None:
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another user")
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", code]
    if subprocess.run(command[:-2] + ["-c", "pass"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot run python3 as uid 65534 here")
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_triton_opens_no_port_but_metrics_and_other_users_cannot_reach_its_grpc(server):
    """Triton's gRPC (and with it its system-shared-memory API) is a Unix socket in the 0700 workspace."""
    processes = _cmdlines_of(server.process.pid)
    (triton,) = [pid for pid, c in processes.items() if c.split(b"\0")[0].endswith(b"tritonserver")]
    assert _listening_tcp_ports(triton) == {server.metrics}
    assert _listening_tcp_ports(server.process.pid) == {server.http}
    assert all(not _listening_tcp_ports(pid) for pid in processes if pid not in (triton, server.process.pid))      # the stubs
    socket_path = os.path.join(server.workspace_path(), "grpc:0")
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode) and os.stat(server.workspace_path()).st_mode & 0o777 == 0o700
    with grpcclient.InferenceServerClient(f"unix:{socket_path}") as client:          # this user: served
        assert client.is_server_ready() and client.get_server_metadata().name == "t2f-serve-" + server.workspace_path().rsplit("-", 1)[1]
    probe = _as_another_user(
        "import socket\n"
        f"u = socket.socket(socket.AF_UNIX)\ntry:\n    u.connect({socket_path!r}); print('unix: connected')\n"
        "except OSError as e:\n    print('unix:', e.strerror)\n"
        f"t = socket.socket()\ntry:\n    t.connect(('127.0.0.1', {server.grpc})); print('tcp: connected')\n"
        "except OSError as e:\n    print('tcp:', e.strerror)\n")
    assert probe.stdout.splitlines() == ["unix: Permission denied", "tcp: Connection refused"], probe


def test_an_unclean_triton_death_leaves_nothing_in_the_temp_directories():
    """Triton's temporary files live in its workspace, and the Python backend's /tmp/python_env_* (a fixed
    path) goes with it, after Triton or t2f-serve itself is killed. /tmp is a directory of this test's (a mount namespace)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root) to give the server a /tmp of its own")
    import t2f

    needed = [os.path.dirname(t2f.__file__), sys.prefix, *filter(None, sys.path)]        # what the server imports from
    hidden = [p for p in needed if os.path.realpath(p) == "/tmp" or os.path.realpath(p).startswith("/tmp/")]
    if hidden:
        pytest.skip(f"t2f or its Python lives under /tmp ({hidden[0]}), which this test replaces with a folder of its own")
    root = tempfile.mkdtemp(prefix="t2f-test-", dir="/var/tmp")                  # not under /tmp, which the server sees replaced
    first = second = None
    try:
        cache, private_tmp, tmpdir = (os.path.join(root, name) for name in ("cache", "tmp", "tmpdir"))
        for path in (cache, private_tmp, tmpdir):
            os.mkdir(path)
        wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'mount --bind "{private_tmp}" /tmp && exec "$@"', "sh"]
        python_envs = lambda: sorted(n for n in os.listdir(private_tmp) if n.startswith("python_env_"))   # noqa: E731
        first = Running(cache, web=False, wrap=wrap, env={"TMPDIR": tmpdir})
        assert len(python_envs()) == 1
        (triton,) = [pid for pid, c in _cmdlines_of(first.process.pid).items() if c.split(b"\0")[0].endswith(b"tritonserver")]
        os.kill(triton, signal.SIGKILL)
        first.wait_for("ready again", timeout_s=240)
        assert len(python_envs()) == 1                                              # the dead Triton's is gone
        os.kill(first.process.pid, signal.SIGKILL)                                  # t2f-serve itself: its Triton dies with it
        first.process.wait(timeout=60)
        first.log.close()
        assert len(python_envs()) == 1
        second = Running(cache, web=False, wrap=wrap, env={"TMPDIR": tmpdir})       # ends what the first left
        assert "removed 1 workspace(s) of stopped servers" in second.output()
        assert len(python_envs()) == 1                                              # the second's own
        assert second.stop(signal.SIGTERM) == 0, second.final_output
        assert python_envs() == [] and os.listdir(tmpdir) == [], (os.listdir(private_tmp), os.listdir(tmpdir))
        assert os.listdir(os.path.join(cache, "serve")) == []
    finally:
        for running in (first, second):                                          # a failed check leaves no server behind
            if running is not None and running.process.poll() is None:
                running.stop(signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


FAKE_TRITON = """#!{python}
# A tritonserver that answers readiness over gRPC; its first FAKE_TRITON_DEATHS times it dies FAKE_TRITON_LIFE seconds after
# t2f-serve found it ready.
import os, signal, sys, threading, time
from concurrent import futures
import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(os.environ["FAKE_TRITON_STARTS"], "a") as f:
    f.write("start\\n")
starts = open(os.environ["FAKE_TRITON_STARTS"]).read().count("start")


class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        seen.set()
        return service_pb2.ServerMetadataResponse(name=args["--id"])


seen = threading.Event()

server = grpc.server(futures.ThreadPoolExecutor(2))
service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Service(), server)
server.add_insecure_port(f"{{args['--grpc-address']}}:{{args['--grpc-port']}}")
server.start()
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
seen.wait()
time.sleep(float(os.environ["FAKE_TRITON_LIFE"]) if starts <= int(os.environ["FAKE_TRITON_DEATHS"]) else 3600)
os._exit(3)
"""


def test_a_triton_killed_again_and_again_is_restarted_within_a_budget_and_never_given_up(tmp_path):
    """--restarts is a budget per window with backoff: whoever kills Triton slows restarts down, never ends them."""
    root = tmp_path / "triton"
    (root / "bin").mkdir(parents=True)
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").write_bytes(b"")
    fake = root / "bin" / "tritonserver"
    fake.write_text(FAKE_TRITON.format(python=sys.executable))
    fake.chmod(0o755)
    env = dict(FAKE_TRITON_STARTS=str(tmp_path / "starts"), FAKE_TRITON_LIFE="0.5", FAKE_TRITON_DEATHS="4")
    running = Running(tmp_path, web=False, extra=["--tritonserver", str(fake), "--restarts", "2"], env=env)
    running.wait_for("(2 restart(s) in the last 600 s)", timeout_s=120)          # the third death: this window's budget is spent
    time.sleep(2)
    assert running.process.poll() is None, running.output()                      # waiting for the window, not exiting 1
    lines = [line for line in running.output().splitlines() if line.startswith("Triton Inference Server")]
    died = "Triton Inference Server exited with status 3 (run with --verbose for its log); restarting"
    assert lines[:2] == [died, f"{died} in 1 s (1 restart(s) in the last 600 s)"] and len(lines) == 3, running.output()
    wait = re.fullmatch(re.escape(died) + r" in (\d+) s \(2 restart\(s\) in the last 600 s\)", lines[2])
    assert wait and 550 < int(wait.group(1)) < 600, lines[2]                     # until the first restart leaves the window
    assert running.stop(signal.SIGTERM) == 0, running.final_output                # a stop ends the wait at once
    assert "Traceback" not in running.final_output and running.final_output.rstrip().endswith("stopped")


def test_triton_gets_this_interpreter(tmp_path):
    from t2f.engine.serve.tritonserver import Binaries, Triton, Workspace, python_libdir

    workspace = Workspace(str(tmp_path))
    try:
        env = Triton(Binaries("tritonserver", str(tmp_path), tuple(python_libdir()) + ("/opt/libs",)), workspace).environment()
    finally:
        workspace.remove()
    assert env["LD_LIBRARY_PATH"].split(":")[: len(python_libdir()) + 1] == python_libdir() + ["/opt/libs"]
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)     # the stub's interpreter: this one


def test_usage_errors_exit_2(tmp_path):
    from click.testing import CliRunner

    from t2f.engine.serve import main

    result = CliRunner().invoke(main, [*TINY, "--http-port", "9000", "--metrics-port", "9000"])
    assert result.exit_code == 2 and "every port must differ" in result.output
    result = CliRunner().invoke(main, [*TINY, "--grpc-host", "127.0.0.1", "--http-port", "9000", "--grpc-port", "9000"])
    assert result.exit_code == 2 and "every port must differ: --http-port 9000, --metrics-port 8002, --grpc-port 9000" in result.output
    result = CliRunner().invoke(main, [*TINY, "--device", "cpu", "--max-body-memory", "8"])
    assert result.exit_code == 2 and "8 MiB is less than one request of --max-batch 32 may send (52 MiB)" in result.output
    result = CliRunner().invoke(main, [*TINY, "--device", "cpu", "--precision", "fp16"])
    assert result.exit_code == 2 and "fp16 needs a CUDA device" in result.output
    result = CliRunner().invoke(main, [*TINY, "--device", "cpu", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "give --token-file" in result.output
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    result = CliRunner().invoke(main, [*TINY, "--device", "cpu", "--token-file", str(token)])
    assert result.exit_code == 2 and "can be read by other users" in result.output
    token.chmod(0o600)
    token.write_text("short")
    result = CliRunner().invoke(main, [*TINY, "--device", "cpu", "--token-file", str(token)])
    assert result.exit_code == 2 and "16..256 characters" in result.output


# Two instances, last: the shared-memory check after stopping them holds while the other servers are idle.


@pytest.fixture(scope="module")
def two_instances(tmp_path_factory):
    """Two model instances (two pipelines, eager PyTorch fp32) on the CPU, graphs in blocks of 4 rows; batches of up to 4 rows that
    wait up to 0.5 s to fill; a bearer token (--token-file) that HTTP clients must send; Triton's gRPC on TCP too (--grpc-host:
    no token)."""
    cache = tmp_path_factory.mktemp("serve2")
    token_file = cache / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    running = Running(cache, web=False, devices=("cpu", "cpu"), max_batch=4,
                      extra=["--queue-delay-us", "500000", "--batch", "4", "--token-file", str(token_file), "--backend", "torch",
                             "--precision", "fp32", "--grpc-host", "127.0.0.1"])
    yield running
    if running.process.poll() is None:                  # (the last test stops it and checks what it leaves)
        assert running.stop(signal.SIGTERM) == 0, running.final_output
        assert not running.leftovers()


def _at_once(calls: list) -> list:
    """Run the calls on threads of their own, released together; each one's result or exception."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            return call()
        except InferenceServerException as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_random_noise_is_served_by_the_torch_backend_as_t2f_infer_makes_it(two_instances, direct4):
    with grpcclient.InferenceServerClient(two_instances.grpc_url) as client:
        noisy = client.infer("t2f", text_inputs(grpcclient, ["a child"], [5], [0.8], noise_mode="random"))
    faces = direct4(["a child"], n=1, seed=5, truncation_psi=0.8, noise_mode="random")
    assert_same(noisy.as_numpy("image")[0], noisy.as_numpy("ws")[0], faces, 0)

MERGED_BAD = [(dict(prompts=[""]), "prompt is empty"), (dict(truncations=[float("nan")]), "truncation must be a finite number"),
              (dict(prompts=["face " * 100]), "prompt is too long"), (dict(seeds=[-1]), "seed must be in")]   # Triton merges
# only requests with the same inputs: a bad noise_mode would need one in every request of the batch


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_a_bad_request_fails_alone_in_the_batch_it_was_merged_into(two_instances, direct4, module):
    url = f"127.0.0.1:{two_instances.http}" if module is httpclient else two_instances.grpc_url
    good = [dict(prompts=["a smiling woman"], seeds=[3], truncations=[0.7], samples=[1]),
            dict(prompts=["an old man"], seeds=[8], truncations=[0.5], samples=[0]),
            dict(prompts=["a child"], seeds=[1], truncations=[1.0], samples=[2])]
    expected = [direct4(g["prompts"], n=g["samples"][0] + 1, seed=g["seeds"][0], truncation_psi=g["truncations"][0]) for g in good]

    def call(args):
        with module.InferenceServerClient(url) as client:
            return client.infer("t2f", text_inputs(module, **args), headers=AUTH if module is httpclient else None)   # gRPC: Triton's own

    for change, message in MERGED_BAD:
        bad = {**dict(prompts=["a smiling woman"], seeds=[0], truncations=[0.7], samples=[0]), **change}
        for attempt in range(3):                   # the 4 requests fill a batch of 4 unless one comes 0.5 s late
            executions, requests = _metrics(two_instances, "nv_inference_exec_count", "nv_inference_request_success")
            answers = _at_once([lambda a=args: call(a) for args in [good[0], bad, good[1], good[2]]])
            for answer, args, faces in zip(answers[:1] + answers[2:], good, expected):
                assert not isinstance(answer, Exception), answer
                assert_same(answer.as_numpy("image")[0], answer.as_numpy("ws")[0], faces, args["samples"][0])
            assert isinstance(answers[1], InferenceServerException) and message in str(answers[1]), answers[1]
            assert answers[1].status() in ("400", "StatusCode.INVALID_ARGUMENT"), answers[1].status()     # the client's error
            deadline = time.monotonic() + 30       # Triton records a request's statistics after answering it
            while (after := _metrics(two_instances, "nv_inference_exec_count", "nv_inference_request_success"))[1] < requests + 4:
                assert time.monotonic() < deadline, (after, requests)
                time.sleep(0.05)
            assert after[1] == requests + 4        # Triton counts a request refused by its own response as a success
            if after[0] - executions == 1:         # one execution answered all four: they were merged
                break
        else:
            pytest.fail(f"the 4 requests were never merged into one batch ({message})")
    with module.InferenceServerClient(url) as client:
        headers = AUTH if module is httpclient else None
        assert client.is_server_live(headers=headers) and client.is_model_ready("t2f", headers=headers)


def test_two_instances_on_one_device_both_serve_the_same_faces(two_instances, direct4):
    # 32 requests from 16 threads, batches of at most 4 rows: several batches at once, so both instances work.
    jobs = [(f"person {k}", 200 + k, 0.6 + (k % 3) * 0.1, j, "random" if k % 2 == 0 else "const") for k in range(8) for j in range(4)]

    def call(chunk):
        with httpclient.InferenceServerClient(f"127.0.0.1:{two_instances.http}", connection_timeout=300, network_timeout=300) as client:
            out = []
            for prompt, seed, psi, sample, noise in chunk:
                result = client.infer("t2f", text_inputs(httpclient, [prompt], [seed], [psi], samples=[sample], noise_mode=noise), headers=AUTH)
                out.append((result.as_numpy("image")[0], result.as_numpy("ws")[0]))
            return out

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        chunks = [jobs[t::16] for t in range(16)]
        answers = dict(zip([job for chunk in chunks for job in chunk], [a for c in pool.map(call, chunks) for a in c]))
    for k in range(8):                   # t2f-infer PROMPT --n 4 --seed SEED --truncation PSI [--noise-mode random]
        prompt, seed, psi, _, noise = jobs[4 * k]
        faces = direct4([prompt], n=4, seed=seed, truncation_psi=psi, noise_mode=noise)
        for j in range(4):
            assert_same(*answers[(prompt, seed, psi, j, noise)], faces, j)
    assert two_instances.stop(signal.SIGTERM) == 0, two_instances.final_output
    served = re.findall(r"t2f_0_(\d): (\d+) request\(s\), (\d+) row\(s\)", two_instances.final_output)
    assert [i for i, _, _ in served] == ["0", "1"], two_instances.final_output      # the t2f model's two instances
    assert all(int(requests) > 0 for _, requests, _ in served), served           # each instance answered requests
    assert sum(int(rows) for _, _, rows in served) >= len(jobs)
    assert not two_instances.leftovers()
