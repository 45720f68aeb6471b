"""t2f-serve: the real Triton Inference Server on 127.0.0.1 with the tiny models, called over HTTP, gRPC and a browser.

Results are compared with the direct pipeline at the same --batch bit for bit (the default, 1 on the CPU; and 4):
the graphs run on fixed blocks of --batch rows, so a row does not depend on the requests the
batcher merged it with (test_engine.test_a_rows_result_does_not_depend_on_the_rows_beside_it).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("pytriton", reason='t2f-serve needs the serve extra: pip install -e ".[serve]"')
httpclient = pytest.importorskip("tritonclient.http", reason='t2f-serve tests need tritonclient: pip install -e ".[serve]"')
grpcclient = pytest.importorskip("tritonclient.grpc", reason='t2f-serve tests need tritonclient: pip install -e ".[serve]"')
from tritonclient.utils import InferenceServerException  # noqa: E402

from engine_helpers import TINY, tiny_pipeline  # noqa: E402
from t2f.engine.pipeline import face_tensor  # noqa: E402
from t2f.engine.serve import MAX_SAMPLE, python_library_path  # noqa: E402

MAX_BATCH = 16
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


class Running:
    """A t2f-serve process on free ports."""

    def __init__(self, cache, web: bool, extra=(), devices=("cpu",), max_batch=MAX_BATCH):
        self.http, self.grpc, self.metrics, self.web = free_port(), free_port(), free_port(), free_port()
        self.cache = str(cache)
        args = [sys.executable, "-m", "t2f.engine.serve", *TINY, *[a for d in devices for a in ("--device", d)], "--max-batch", str(max_batch),
                "--cache", self.cache,
                "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *extra]
        if web:
            args += ["--web", "--web-port", str(self.web)]
        self.shm_before = set(os.listdir("/dev/shm"))
        env = dict(os.environ, T2F_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.log_path = os.path.join(self.cache, "serve.log")
        self.log = open(self.log_path, "a")                                 # appends, whatever the offset
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while "ready; Ctrl-C to stop" not in self.output():            # both models loaded, and the page up
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
        pid = self.process.pid
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if os.path.join(self.cache, "serve") in cmdline or f"pytrtion{pid}-" in cmdline:
                    found.append(f"process {entry}: {cmdline[:120]}")
        # Triton's stub segments carry the server's pid; PyTriton's tensor store segments (psm_*) are the new ones.
        found += [f"/dev/shm/{name}" for name in os.listdir("/dev/shm")
                  if name.startswith(f"pytrtion{pid}-") or (name.startswith("psm_") and name not in self.shm_before)]
        serve_dir = os.path.join(self.cache, "serve")
        found += [os.path.join(serve_dir, name) for name in (os.listdir(serve_dir) if os.path.isdir(serve_dir) else [])]
        found += [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(f"t2f-serve-{pid}-")]   # a long cache path's workspace
        return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Running(tmp_path_factory.mktemp("serve"), web=True, extra=["--queue-delay-us", "5000"])
    yield running
    assert running.stop(signal.SIGTERM) == 0, running.final_output
    assert not running.leftovers()


@pytest.fixture(scope="module")
def direct():
    return tiny_pipeline(batch_size=None)          # t2f-infer's default --batch, as the server's (1 on the CPU)


@pytest.fixture(scope="module")
def direct4():
    return tiny_pipeline(batch_size=4)             # t2f-infer --batch 4: the two-instance server's blocks, padded


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
    url = f"127.0.0.1:{server.http if module is httpclient else server.grpc}"
    with module.InferenceServerClient(url) as client:
        assert client.is_server_ready() and client.is_model_ready("t2f") and client.is_model_ready("t2f_image")
        result = client.infer("t2f", text_inputs(module, **ROWS))
        images, ws = result.as_numpy("image"), result.as_numpy("ws")
        assert images.shape[0] == 3
        for r in range(3):   # row r is image `sample` of t2f-infer PROMPT --n sample+1 --seed SEED --truncation PSI
            faces = direct([ROWS["prompts"][r]], n=ROWS["samples"][r] + 1, seed=ROWS["seeds"][r], truncation_psi=ROWS["truncations"][r])
            assert_same(images[r], ws[r], faces, ROWS["samples"][r])
        assert not np.array_equal(images[0], images[2])                    # same prompt, other seed and sample
        # Without `sample`, each row is the first image of its seed; noise_mode random as t2f-infer --noise-mode random.
        noisy = client.infer("t2f", text_inputs(module, ["a child"], [5], [0.8], noise_mode="random"))
        faces = direct(["a child"], n=1, seed=5, truncation_psi=0.8, noise_mode="random")
        assert_same(noisy.as_numpy("image")[0], noisy.as_numpy("ws")[0], faces, 0)


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
    url = f"127.0.0.1:{server.http if module is httpclient else server.grpc}"
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
    with websockets.connect(f"ws://127.0.0.1:{server.web}/ws", max_size=None) as ws:
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
            page.goto(f"http://127.0.0.1:{server.web}/")
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


def test_ctrl_c_stops_triton_and_leaves_nothing(tmp_path):
    cache = tmp_path / ("a-cache-directory-with-a-long-name" * 2)        # too long for Triton's sockets: workspace in /tmp
    cache.mkdir()
    running = Running(cache, web=False)
    assert running.stop(signal.SIGINT, group=True) == 0, running.final_output        # Triton gets the SIGINT too
    assert "stopped" in running.final_output and "workspace in" in running.final_output
    assert not running.leftovers()


def test_python_library_path_is_set_for_triton_and_restored(monkeypatch):
    import sysconfig

    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other")
    libdir = sysconfig.get_config_var("LIBDIR")
    has_lib = any(name.startswith("libpython") for name in os.listdir(libdir))
    with python_library_path():
        inside = os.environ["LD_LIBRARY_PATH"]
    assert inside == (f"{libdir}:/opt/other" if has_lib else "/opt/other")
    assert os.environ["LD_LIBRARY_PATH"] == "/opt/other"


def test_usage_errors_exit_2():
    from click.testing import CliRunner

    from t2f.engine.serve import main

    result = CliRunner().invoke(main, [*TINY, "--http-port", "9000", "--grpc-port", "9000"])
    assert result.exit_code == 2 and "every port must differ" in result.output
    result = CliRunner().invoke(main, [*TINY, "--device", "cpu", "--precision", "fp16"])
    assert result.exit_code == 2 and "fp16 needs a CUDA device" in result.output


def test_a_pytriton_without_wrap_response_fails_at_startup_in_one_line():
    from t2f.engine.serve import PROXY_SHIM, proxy_model_files

    model = b"import x\n\ndef _wrap_response(response, names, outputs):\n    get_config_from_handshake_server(handshake_socket)\n"
    assert proxy_model_files({"file:1/model.py": model, "file:1/data.py": b""})["file:1/model.py"] == model + PROXY_SHIM.encode()
    for changed in (model.replace(b"_wrap_response", b"wrap_response"), model.replace(b"get_config_from", b"config_from")):
        with pytest.raises(RuntimeError, match=r"^nvidia-pytriton \S+'s proxy model has no _wrap_response\(response, \.\.\.\)[^\n]*$"):
            proxy_model_files({"file:1/model.py": changed})


# Two instances, last: the shared-memory check after stopping them holds while the other servers are idle.


@pytest.fixture(scope="module")
def two_instances(tmp_path_factory):
    """Two model instances (two pipelines) on the CPU, graphs in blocks of 4 rows; batches of up to 4 rows that wait up to 0.5 s to fill."""
    running = Running(tmp_path_factory.mktemp("serve2"), web=False, devices=("cpu", "cpu"), max_batch=4,
                      extra=["--queue-delay-us", "500000", "--batch", "4"])
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


MERGED_BAD = [(dict(prompts=[""]), "prompt is empty"), (dict(truncations=[float("nan")]), "truncation must be a finite number"),
              (dict(prompts=["face " * 100]), "prompt is too long"), (dict(seeds=[-1]), "seed must be in")]   # Triton merges
# only requests with the same inputs: a bad noise_mode would need one in every request of the batch


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_a_bad_request_fails_alone_in_the_batch_it_was_merged_into(two_instances, direct4, module):
    url = f"127.0.0.1:{two_instances.http if module is httpclient else two_instances.grpc}"
    good = [dict(prompts=["a smiling woman"], seeds=[3], truncations=[0.7], samples=[1]),
            dict(prompts=["an old man"], seeds=[8], truncations=[0.5], samples=[0]),
            dict(prompts=["a child"], seeds=[1], truncations=[1.0], samples=[2])]
    expected = [direct4(g["prompts"], n=g["samples"][0] + 1, seed=g["seeds"][0], truncation_psi=g["truncations"][0]) for g in good]

    def call(args):
        with module.InferenceServerClient(url) as client:
            return client.infer("t2f", text_inputs(module, **args))

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
        assert client.is_server_live() and client.is_model_ready("t2f")


def test_two_instances_on_one_device_both_serve_the_same_faces(two_instances, direct4):
    # 32 requests from 16 threads, batches of at most 4 rows: several batches at once, so both instances work.
    jobs = [(f"person {k}", 200 + k, 0.6 + (k % 3) * 0.1, j, "random" if k % 2 == 0 else "const") for k in range(8) for j in range(4)]

    def call(chunk):
        with httpclient.InferenceServerClient(f"127.0.0.1:{two_instances.http}", connection_timeout=300, network_timeout=300) as client:
            out = []
            for prompt, seed, psi, sample, noise in chunk:
                result = client.infer("t2f", text_inputs(httpclient, [prompt], [seed], [psi], samples=[sample], noise_mode=noise))
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
    served = re.findall(r"instance (\d) \(cpu\): (\d+) request\(s\), (\d+) row\(s\)", two_instances.final_output)
    assert [i for i, _, _ in served] == ["0", "1"], two_instances.final_output
    assert all(int(requests) > 0 for _, requests, _ in served), served           # each instance answered requests
    assert sum(int(rows) for _, _, rows in served) >= len(jobs)
    assert not two_instances.leftovers()


def test_the_proxy_appendix_waits_for_the_first_instances_handshake(tmp_path):
    """Another instance of a model that asks while the first one's handshake socket exists but does not listen yet:
    PyTriton's own call gives up (the model failed to load); the appendix's asks again until it answers."""
    from pytriton.proxy import communication

    from t2f.engine.serve import PROXY_SHIM

    appendix = dict(_wrap_response=None, get_config_from_handshake_server=communication.get_config_from_handshake_server)
    exec(PROXY_SHIM, appendix)
    path = tmp_path / "t2f-config.sock"
    early = socket.socket(socket.AF_UNIX)
    early.bind(str(path))                            # bound, not listening: what the first instance is for a moment
    with pytest.raises(ConnectionRefusedError):
        communication.get_config_from_handshake_server(path)
    servers = []

    def listen_later():
        time.sleep(0.5)
        early.close()
        path.unlink()
        servers.append(communication.HandshakeServer(path, {"data_socket": "t2f-data.sock"}))
        servers[0].start()

    thread = threading.Thread(target=listen_later)
    thread.start()
    try:
        assert appendix["get_config_from_handshake_server"](path) == {"data_socket": "t2f-data.sock"}
    finally:
        thread.join()
        servers[0].close()
