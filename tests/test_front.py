"""t2f-serve's HTTP front on real sockets of 127.0.0.1, without Triton: what unauthenticated clients can do to it.

Heads without end, half-sent heads, idle and too many connections, held and slow bodies, what a client
writes into the log, malformed requests, and the token file; and the supervision that restarts Triton,
with a fake Triton (a process that dies). A request that passes every check is forwarded to a Triton
that is not there: 503, which tells it from a refusal.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import zlib

import click
import pytest

pytest.importorskip("uvicorn", reason='the front needs uvicorn and starlette: pip install -e ".[serve]"')
pytest.importorskip("tritonclient.grpc", reason='the front needs tritonclient: pip install -e ".[serve]"')

from helpers import free_port, http_request  # noqa: E402
from t2f.engine.serve.connections import FrontLimits, fit_descriptors  # noqa: E402
from t2f.engine.serve.supervise import RestartBudget, Stopped, supervise  # noqa: E402
from t2f.engine.serve.web import Front, FrontConfig  # noqa: E402

NO_TRITON = "unix:/nonexistent/t2f-test/grpc:0"
GOOD = json.dumps(dict(inputs=[dict(name="prompt", datatype="BYTES", shape=[1, 1], data=["a face"]),
                               dict(name="seed", datatype="INT64", shape=[1, 1], data=[0]),
                               dict(name="truncation", datatype="FP32", shape=[1, 1], data=[0.7])])).encode()


@contextlib.contextmanager
def running_front(limits: FrontLimits = FrontLimits(), **config):
    front = Front(FrontConfig(grpc_url=NO_TRITON, limits=limits, **config), "127.0.0.1", free_port())
    front.start()
    try:
        yield front
    finally:
        front.stop()


@pytest.fixture(scope="module")
def front():
    """The front with every default limit."""
    with running_front() as f:
        yield f


def connect(port: int, source: str = "127.0.0.1", timeout: float = 30) -> socket.socket:
    """A TCP connection to 127.0.0.1:port from `source` (any 127.x.y.z: one more client address)."""
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def answer(s: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes (or `timeout`)."""
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError, socket.timeout):
        while chunk := s.recv(65536):
            data += chunk
    return data


def trickle(s: socket.socket, data: bytes, times: int, every_s: float) -> None:
    """Send `data` every `every_s` seconds, `times` times at most, until the server answers or closes."""
    with contextlib.suppress(OSError):
        for _ in range(times):
            s.sendall(data)
            time.sleep(every_s)
            if select.select([s], [], [], 0)[0]:
                break


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# ----------------------------------------------------------------------------
# Heads and connections.


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_never_ending_header_is_answered_431_at_the_head_limit_whatever_the_parser(parser):
    pytest.importorskip(parser)
    with running_front(FrontLimits(parser=parser)) as f:
        s = connect(f.port)
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        sent, chunk, deadline = 0, b"a" * 65536, time.monotonic() + 60
        while sent < 256 * 2**20 and time.monotonic() < deadline and not select.select([s], [], [], 0)[0]:   # until answered
            if select.select([], [s], [], 1)[1]:
                sent += s.send(chunk)
        response = answer(s)
        s.close()
        assert status_of(response) == 431 and b"more than 65536 bytes" in response, response[:200]
        assert sent < 32 * 2**20            # answered after the limit and what the sockets' buffers held, not at the end
        assert http_request(f.port, "GET", "/v2/health/live", timeout=30)[0] == 200


@pytest.mark.parametrize("parser", [pytest.param("h11", marks=pytest.mark.slow), "httptools"])   # h11 stops reading by itself
def test_a_never_ending_head_pipelined_behind_a_request_in_flight_is_cut_too(parser):
    """While GET /metrics waits on a Triton that does not answer (5 s), the next request's head comes without end."""
    pytest.importorskip(parser)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with running_front(FrontLimits(parser=parser), metrics_url=f"http://127.0.0.1:{silent.getsockname()[1]}/metrics") as f:
            s = connect(f.port)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
            sent, chunk, deadline, closed = 0, b"a" * 65536, time.monotonic() + 30, False
            while sent < 128 * 2**20 and time.monotonic() < deadline and not closed:
                readable, writable, _ = select.select([s], [s], [], 1)
                try:
                    if readable and not s.recv(65536, socket.MSG_PEEK):
                        closed = True                                  # the server closed
                    elif readable:
                        s.recv(65536)                                  # the answer to GET /metrics (503)
                    elif writable:
                        sent += s.send(chunk)
                except OSError:
                    closed = True                                      # reset
            s.close()
            assert closed and sent < 128 * 2**20, sent               # cut, not read on and on
            assert http_request(f.port, "GET", "/v2/health/live", timeout=30)[0] == 200
            silent.close()                                         # GET /metrics ends (503): the front stops at once


def test_half_sent_heads_get_408_and_idle_connections_close():
    with running_front(FrontLimits(head_timeout_s=1.0, idle_timeout_s=1.5)) as f:
        slow, idle = connect(f.port), connect(f.port)
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        trickle(slow, b"X", 100, 0.1)                      # one header byte every 0.1 s: never complete
        response = answer(slow)
        assert status_of(response) == 408 and b"took more than 1 s" in response, response
        assert time.monotonic() - start < 8
        assert answer(idle, timeout=15) == b""             # closed without a word
        assert http_request(f.port, "GET", "/v2/health/live")[0] == 200


def test_a_client_that_stops_reading_its_answer_is_dropped_after_the_idle_timeout():
    """A 32 MiB answer (GET /metrics) the client never reads: the front drops it after idle_timeout_s instead of holding it."""
    import http.server

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(32 * 2**20))
            self.end_headers()
            self.wfile.write(b"#" * (32 * 2**20))

        def log_message(self, *args):
            pass

    metrics = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=metrics.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{metrics.server_address[1]}/metrics"
        with running_front(FrontLimits(idle_timeout_s=1.5), metrics_url=url) as f:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)      # before connecting: the window stays small
            s.connect(("127.0.0.1", f.port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            time.sleep(4)                                                   # answered, never read
            received = 0
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(2**20):
                    received += len(chunk)
            s.close()
            assert received < 32 * 2**20, received                        # dropped, not kept for a reader that never comes
    finally:
        metrics.shutdown()


@pytest.mark.slow
def test_the_default_head_timeout_closes_a_slowloris(front):
    s = connect(front.port)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    response = answer(s, timeout=40)
    assert status_of(response) == 408 and b"took more than 10 s" in response, response


def test_connections_are_capped_per_client_and_the_others_are_served(front, capfd):
    attacker = [connect(front.port, "127.0.0.2") for _ in range(FrontLimits().max_connections_per_client)]
    try:
        extra = connect(front.port, "127.0.0.2")
        response = answer(extra)
        assert status_of(response) == 503 and b"127.0.0.2 has 256 connections open" in response, response
        assert http_request(front.port, "GET", "/v2/health/live")[0] == 200      # another client is served meanwhile
    finally:
        for s in attacker:
            s.close()
    deadline = time.monotonic() + 10                     # the closed ones are counted out again
    while health_from(front.port, "127.0.0.2") != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert capfd.readouterr().err.count("refused a connection from 127.0.0.2") == 1      # one line, not one per connection


def test_the_connection_cap_counts_every_client_and_websockets():
    websockets = pytest.importorskip("websockets.sync.client", reason="needs websockets")
    from websockets.exceptions import ConnectionClosed

    with running_front(FrontLimits(max_connections=6, max_connections_per_client=4), page=True) as f:
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(connect(f.port, "127.0.0.2")) for _ in range(3)]
            sockets = [stack.enter_context(websockets.connect(f"ws://127.0.0.1:{f.port}/ws")) for _ in range(3)]   # still counted
            assert len(held) == 3 and status_of(answer(connect(f.port, "127.0.0.3"))) == 503
            sockets[0].send(b"\x00\x01")                     # a binary frame: the page closes it (1003), as without the cap
            with pytest.raises(ConnectionClosed) as info:
                sockets[0].recv(timeout=10)
            assert info.value.rcvd.code == 1003
        deadline = time.monotonic() + 10
        while health_from(f.port, "127.0.0.3") != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def health_from(port: int, source: str) -> int:
    """The status of GET /v2/health/live from client address `source` (0: no answer)."""
    with contextlib.closing(connect(port, source, timeout=5)) as s:
        with contextlib.suppress(OSError):
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return status_of(answer(s, timeout=5))


def test_the_connection_cap_fits_the_processes_file_descriptors():
    import t2f.engine.serve.connections as connections

    code = ("import importlib.util, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)); "   # the module alone: no torch
            f"spec = importlib.util.spec_from_file_location('c', {connections.__file__!r}); c = importlib.util.module_from_spec(spec); "
            "sys.modules['c'] = c; spec.loader.exec_module(c); limits, line = c.fit_descriptors(c.FrontLimits()); "
            "print(limits.max_connections, limits.max_connections_per_client); print(line)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["44 11", "--max-connections lowered to 44: this process may open 300 files (ulimit -n)"], out
    assert fit_descriptors(FrontLimits(max_connections=8))[0].max_connections == 8


# ----------------------------------------------------------------------------
# Addresses and ports: decided once, for the command (--host without a token), the Host check and every port.


def test_loopback_is_localhost_127_8_and_ip6_one_only():
    from t2f.engine.serve.addresses import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "LocalHost", "::1", "[::1]", "0:0::1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "128.0.0.1", "[::2]", "127.example.org",
                                            "localhost.example.org", "127.0.0.1.nip.io"))


def test_a_taken_port_is_one_line_naming_its_option():
    from t2f.engine.serve.addresses import bind_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as e:
            bind_port("127.0.0.1", port, "--metrics-port")
        assert str(e.value) == f"port {port} on 127.0.0.1 is in use (--metrics-port): Address already in use"
    with bind_port("127.0.0.1", port, "--metrics-port") as free:                 # free again once its holder closed it
        assert free.getsockname() == ("127.0.0.1", port)


# ----------------------------------------------------------------------------
# Bodies.


def infer_head(length: int, path: str = "/v2/models/t2f/infer", extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


def test_body_bytes_held_across_requests_are_capped_with_503():
    limits = FrontLimits(max_body_memory=3 * 2**20)
    with running_front(limits) as f:
        first, second = connect(f.port), connect(f.port)
        first.sendall(infer_head(2 * 2**20) + b"{" * 1000)                 # holds 2 MiB of the 3
        time.sleep(0.5)
        second.sendall(infer_head(2 * 2**20) + b"{" * 1000)
        response = answer(second)
        assert status_of(response) == 503 and b"may hold 3145728" in response, response
        first.close()
        deadline = time.monotonic() + 10                                   # given back when the request ends
        while b"may hold" in (text := http_request(f.port, "POST", "/v2/models/t2f/infer", GOOD + b" " * 2**21)[1]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert b"failed to connect" in text or b"unavailable" in text.lower(), text    # on to the (absent) Triton


def test_stalled_and_slow_bodies_get_408():
    with running_front(FrontLimits(body_stall_s=1.0, min_body_rate=1000)) as f:
        stalled = connect(f.port)
        stalled.sendall(infer_head(100_000) + b"{")
        response = answer(stalled)
        assert status_of(response) == 408 and b"no part of the body came for 1 s" in response, response
        slow = connect(f.port)
        slow.sendall(infer_head(100_000))
        trickle(slow, b" ", 40, 0.5)                                      # 2 bytes/s: under 1000 bytes/s after the first second
        response = answer(slow)
        assert status_of(response) == 408 and b"slower than" in response, response


@pytest.mark.slow
def test_held_bodies_are_bounded_and_their_memory_is_given_back(tmp_path):
    """Uploads of 50 MiB held one byte short: the front holds at most --max-body-memory of them, answers the rest 503, and
    its memory comes back down when they close (a bound on RSS, never a timing)."""
    port = free_port()
    code = ("import sys, time; from t2f.engine.serve.web import Front, FrontConfig; "
            f"f = Front(FrontConfig(grpc_url={NO_TRITON!r}), '127.0.0.1', {port}); f.start(); print('up', flush=True); time.sleep(600)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout.readline() == "up\n"
        body = b"{" * 2**20
        http_request(port, "POST", "/v2/models/t2f/infer", GOOD)            # the code paths warm
        before = rss_mib(server.pid)
        held, refused = [], 0
        for _ in range(8):
            s = connect(port)
            s.sendall(infer_head(50 * 2**20))
            for _ in range(50):
                if select.select([s], [], [], 0)[0]:                       # answered before the body: refused
                    break
                s.sendall(body if _ < 49 else body[:-1])
            if select.select([s], [], [], 1)[0]:
                response = answer(s, timeout=5)
                assert status_of(response) == 503 and b"may hold" in response, response[:200]
                refused += 1
                s.close()
            else:
                held.append(s)
        during = rss_mib(server.pid)
        assert len(held) == 5 and refused == 3                              # 5 x 50 MiB within the 256 MiB
        assert during - before < 5 * 50 * 2.5, (before, during)            # the held bytes, and not much more
        for s in held:
            s.close()
        deadline = time.monotonic() + 30
        while (after := rss_mib(server.pid)) - before > 64 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert after - before <= 64, (before, during, after)
        assert http_request(port, "GET", "/v2/health/live")[0] == 200
    finally:
        server.kill()
        server.wait()


# ----------------------------------------------------------------------------
# What clients write into the log, and malformed requests.


def infer_body(**change) -> bytes:
    request = json.loads(GOOD)
    for name, value in change.items():
        key, _, field = name.partition("__")
        next(t for t in request["inputs"] if t["name"] == key)[field] = value
    return json.dumps(request).encode()


def test_what_clients_send_is_escaped_in_the_log(front, capfd):
    capfd.readouterr()
    forged = "\nt2f-serve: ready; Ctrl-C to stop\x1b[2J"
    http_request(front.port, "POST", "/v2/models/t2f/infer", infer_body(seed__datatype="INT64" + forged))
    http_request(front.port, "POST", "/v2/models/t2f/infer", infer_body(prompt__parameters=dict(binary_data_size="7" + forged)))
    http_request(front.port, "POST", "/v2/models/%1b[2J%00/infer", GOOD)
    http_request(front.port, "POST", "/v2/models/t2f/infer", GOOD, {"Content-Encoding": "x\x1b[2J"})
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith("t2f-serve: refused POST /v2/models/") for line in lines), err
    assert "\x1b" not in err and "\x00" not in err and "ready; Ctrl-C" not in err.replace("\\nt2f-serve: ready; Ctrl-C", "")
    assert "has data-type INT64\\nt2f-serve: ready; Ctrl-C to stop\\x1b[2J" in lines[0]
    assert "binary_data_size 7\\nt2f-serve" in lines[1] and "POST /v2/models/\\x1b[2J\\x00/infer" in lines[2]


def gzip_garbage() -> bytes:
    return gzip.compress(GOOD)[:10] + b"\xff" * 40


MALFORMED = {   # what the front answered 500 "internal error" to: each is the client's fault
    "header-length-superscript": (GOOD, {"Inference-Header-Content-Length": "\xb2"}, 400, "must be a number of bytes"),
    "header-length-5000-digits": (GOOD, {"Inference-Header-Content-Length": "9" * 5000}, 400, "must be a number of bytes"),
    "truncation-400-digits": (infer_body(truncation__data=[10**400]), {}, 400, "outside FP32's range"),
    "gzip-garbage": (gzip_garbage(), {"Content-Encoding": "gzip"}, 400, "not gzip data"),
    "raw-deflate": (zlib.compress(GOOD)[2:-4], {"Content-Encoding": "deflate"}, 400, "not deflate data (a zlib stream"),
    "outputs-not-a-list": (json.dumps({**json.loads(GOOD), "outputs": 5}).encode(), {}, 400, '"outputs" must be a list'),
    "seed-5000-digits": (GOOD.replace(b'"data": [0]', b'"data": [' + b"9" * 5000 + b"]"), {}, 400, "not JSON"),
    "content-length-superscript": (GOOD, {"Content-Length": "\xb2"}, 400, ""),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_4xx_not_500(front, case, capfd):
    body, headers, status, message = MALFORMED[case]
    got, text = http_request(front.port, "POST", "/v2/models/t2f/infer", body, headers)
    assert got == status and message in text.decode("utf-8", "replace").replace('\\"', '"'), (got, text[:300])
    assert b"internal error" not in text and "Traceback" not in capfd.readouterr().err
    assert http_request(front.port, "POST", "/v2/models/t2f/infer", GOOD)[0] == 503      # the good request: on to Triton


def test_a_head_the_parser_refuses_is_answered_and_closed_without_a_reset(front):
    """The parser's own 400 (a Content-Length that is no number) with 2 MB of body behind it: the client reads the answer
    and then an orderly end, not a reset (closing with the body unread would reset the connection)."""
    head = (b"POST /v2/models/t2f/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \xb2\r\n"
            b"Content-Type: application/json\r\n\r\n")
    s = connect(front.port)

    def send():
        with contextlib.suppress(OSError):                 # the rest of the body may meet the closed connection
            s.sendall(head + b"x" * 2_000_000)
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.3)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        data += b" [reset]"
    finally:
        sender.join(30)
        s.close()
    assert data.startswith(b"HTTP/1.1 400") and not data.endswith(b" [reset]"), data[-200:]


# ----------------------------------------------------------------------------
# The token file.


def read_token_within(path: str, seconds: float = 30):
    """t2f-serve's read_token(path) on a thread of its own: its outcome, or "still reading" after `seconds`."""
    from t2f.engine.serve.cli import read_token

    outcome = ["still reading"]

    def run():
        try:
            outcome[0] = read_token(path)
        except click.BadParameter as e:
            outcome[0] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0]


def test_the_token_file_must_be_a_small_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(2**30)                                  # sparse: 1 GiB of zeros
    huge.chmod(0o600)
    good = tmp_path / "token"
    good.write_text("test-token-0123456789abcdef\n")
    good.chmod(0o600)
    for path, message in [(fifo, "is a FIFO"), ("/dev/zero", "is a character device"), (huge, "holds more than 4096 bytes")]:
        outcome = read_token_within(str(path))
        assert isinstance(outcome, click.BadParameter) and message in outcome.format_message(), outcome
        assert "\n" not in outcome.format_message()
    assert read_token_within(str(good)) == "test-token-0123456789abcdef"


def test_a_fifo_token_file_is_one_line_and_exit_2(tmp_path):
    from click.testing import CliRunner

    from helpers import TINY
    from t2f.engine.serve import main

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = [None]
    thread = threading.Thread(target=lambda: result.__setitem__(0, CliRunner().invoke(main, [*TINY, "--device", "cpu", "--token-file", str(fifo)])),
                              daemon=True)
    thread.start()
    thread.join(120)
    assert result[0] is not None, "t2f-serve --token-file FIFO waits for a writer"
    assert result[0].exit_code == 2 and "is a FIFO; t2f reads regular files only" in result[0].output, result[0].output
    assert "Traceback" not in result[0].output


# ----------------------------------------------------------------------------
# Supervision: a restart budget per window, with backoff.


def test_the_restart_budget_backs_off_and_refills_with_its_window():
    budget = RestartBudget(restarts=3, window_s=100, first_delay_s=1, max_delay_s=3)
    delays = []
    now = 0.0
    for _ in range(6):
        delay = budget.delay(now)
        delays.append(delay)
        now += delay
        budget.record(now)
    # 0, then doubling; the 4th waits until the restart at t=0 leaves the window (t=100), the 5th until the one at t=1 has (and
    # at least its backoff, 3 s), the 6th only its backoff: two restarts (t=100, 103) are left in the window.
    assert delays == [0, 1, 2, 97, 3, 2]
    assert budget.delay(now + 1000) == 0           # once quiet for a window, restarts are immediate again
    assert RestartBudget(restarts=0).delay(0) is None


class FakeTriton:
    """A Triton that dies `deaths` times (a process that exits at once), then stays up."""

    def __init__(self, deaths: int):
        self.deaths, self.starts, self.process = deaths, [], None

    def start(self, cancel=None):
        self.starts.append(time.monotonic())
        code = "pass" if len(self.starts) <= self.deaths else "import time; time.sleep(60)"
        self.process = subprocess.Popen([sys.executable, "-c", code])

    def alive(self):
        return self.process.poll() is None

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def exit_reason(self):
        return f"exited with status {self.process.returncode}"


def test_a_triton_that_keeps_dying_is_restarted_with_backoff_and_never_given_up():
    triton, stop, lines = FakeTriton(deaths=6), threading.Event(), []
    triton.start()
    budget = RestartBudget(restarts=3, window_s=2.5, first_delay_s=0.2, max_delay_s=0.4)
    thread = threading.Thread(target=supervise, args=(triton, stop, budget, lines.append), kwargs=dict(poll_s=0.05), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(triton.starts) < 7 or not triton.alive():
        assert thread.is_alive() and time.monotonic() < deadline, lines
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    thread.join(10)
    triton.stop()
    assert len(triton.starts) == 7 and lines.count("ready again") == 6, lines      # never gave up, and no restart more
    restarts = triton.starts[1:]
    gaps = [b - a for a, b in zip(restarts, restarts[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4                                         # backoff
    for k in range(3, len(restarts)):                                              # at most 3 restarts in any 2.5 s
        assert restarts[k] - restarts[k - 3] >= 2.5 - 0.01, gaps
    assert lines[0] == "Triton Inference Server exited with status 0; restarting"


def test_restarts_0_stops_at_the_first_death():
    triton = FakeTriton(deaths=1)
    triton.start()
    with pytest.raises(Stopped, match="exited with status 0; not restarting"):
        supervise(triton, threading.Event(), RestartBudget(restarts=0), print, poll_s=0.05)
    assert len(triton.starts) == 1


def test_a_workspace_too_long_for_a_unix_socket_is_one_line(tmp_path):
    from t2f.engine.serve.tritonserver import Binaries, Triton, TritonError, Workspace

    workspace = Workspace(str(tmp_path / ("d" * 120)))
    try:
        triton = Triton(Binaries("/bin/false", str(tmp_path), ()), workspace)
        assert triton.grpc_url == f"unix:{workspace.path}/grpc:0"
        with pytest.raises(TritonError, match="too long a path for Triton's gRPC socket .* give a shorter --cache"):
            triton.start()
        assert triton.process is None                                      # refused before anything ran
    finally:
        workspace.remove()

