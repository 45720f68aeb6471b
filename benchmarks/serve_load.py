"""Load on `t2f-serve`: N clients x M requests through Triton, next to the direct pipeline on the same machine.

    python benchmarks/serve_load.py                                            # tiny models, CPU
    python benchmarks/serve_load.py --generator random-256 --clip ViT-B-32:random --clients 8 --requests 4
    python benchmarks/serve_load.py --generator random-1024 --clip ViT-B-32:random --device cuda --precision fp16 \
        --backend torch-cudagraph --clients 32 --requests 50 --json serve-1024.json

Starts `t2f-serve` (a separate process, on free ports of 127.0.0.1), warms it up, then runs
--clients threads, each sending --requests requests of one image (a prompt of its own, a seed
of its own) with tritonclient over --protocol, and stops issuing at --max-seconds. Reports the
p50 / p95 / p99 latency of a request and images/s, and the same for the direct pipeline in this
process: one `TextToFace` call per image in a row (what t2f-infer does per prompt), and one call
of --clients images (the best a batch of that size does without a server). Model loading and
warm-up are excluded. Prints a markdown table and one JSON object (written with --json).

--protocol http goes through t2f's checking front (body checks, then gRPC to Triton); --protocol
grpc goes to Triton directly (the server is started with --grpc-host 127.0.0.1 for it): the
difference between two runs is what the front's hop costs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import click
import numpy as np

from t2f.cli import FiniteFloatRange
from t2f.files import atomic_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(latencies_s: list[float], wall_s: float, images: int) -> dict:
    ms = np.array(latencies_s) * 1000
    return dict(requests=len(ms), images=images, p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)),
                p99_ms=float(np.percentile(ms, 99)), images_per_s=images / wall_s, wall_s=wall_s)


def start_server(args: list[str], http: int, threads: int, timeout_s: float = 600, env: dict | None = None) -> subprocess.Popen:
    """t2f-serve with `args`, once its front answers; `env`: variables to set for it, `threads`: OMP_NUM_THREADS (0: as is)."""
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ, **(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    process = subprocess.Popen([sys.executable, "-m", "t2f.engine.serve", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/t2f/ready", timeout=2) as r:
                if r.status == 200:
                    return process
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.seek(0)
            raise click.ClickException(f"t2f-serve did not start:\n{log.read()[-3000:]}")
        time.sleep(0.5)


@click.command()
@click.option("--generator",      default="tiny", show_default=True)
@click.option("--clip",           default="tiny", show_default=True)
@click.option("--mapper",         default="tiny", show_default=True)
@click.option("--backend",        default="torch", show_default=True)
@click.option("--device",         default="auto", show_default=True)
@click.option("--precision",      default="fp32", show_default=True)
@click.option("--clients",        help="Client threads (N)", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--requests",       help="Requests per client (M)", type=click.IntRange(1, 10_000), default=8, show_default=True)
@click.option("--max-seconds",    help="Stop issuing requests after this long", type=FiniteFloatRange(1, 3600), default=120, show_default=True)
@click.option("--protocol",       type=click.Choice(["http", "grpc"]), default="grpc", show_default=True)
@click.option("--batch",          help="Rows per graph call in both paths [default: 1 on the CPU, 8 on a GPU]", type=click.IntRange(1, 256))
@click.option("--max-batch",      type=click.IntRange(1, 256), default=32, show_default=True)
@click.option("--queue-delay-us", type=click.IntRange(0, 1_000_000), default=0, show_default=True)
@click.option("--truncation",     type=FiniteFloatRange(-1, 2), default=0.7, show_default=True)
@click.option("--threads",        help="CPU threads of torch in both paths (OMP_NUM_THREADS for the server); 0 = torch's default",
              type=click.IntRange(0, 256), default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
def main(generator, clip, mapper, backend, device, precision, clients, requests, max_seconds, protocol, batch, max_batch, queue_delay_us,
         truncation, threads, json_path):
    import torch

    if threads:
        torch.set_num_threads(threads)

    from t2f.engine import load_pipeline

    if protocol == "http":
        import tritonclient.http as client_module
    else:
        import tritonclient.grpc as client_module

    # Direct pipeline, in this process.
    pipe = load_pipeline(generator=generator, clip=clip, mapper=mapper, device=device, precision=precision, batch_size=batch,
                         backend=backend, progress=False)
    pipe(["a warm-up prompt"], n=1, seed=0, truncation_psi=truncation)
    count = clients * requests
    latencies, start = [], time.perf_counter()
    for k in range(count):
        t0 = time.perf_counter()
        pipe([f"a face, client {k}"], n=1, seed=k, truncation_psi=truncation)
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    direct_one = summary(latencies, time.perf_counter() - start, len(latencies))
    pipe._generate_rows(list(range(clients)), [0] * clients, [truncation] * clients, prompts=[f"p{k}" for k in range(clients)])
    latencies, start = [], time.perf_counter()
    for _ in range(3):
        t0 = time.perf_counter()
        pipe._generate_rows(list(range(clients)), [0] * clients, [truncation] * clients, prompts=[f"a face, client {k}" for k in range(clients)])
        latencies.append(time.perf_counter() - t0)
    direct_batch = summary(latencies, time.perf_counter() - start, 3 * clients)
    resolved, blocks = str(pipe.device), pipe.batch_size
    del pipe

    # The server, in a process of its own.
    http, grpc, metrics = free_port(), free_port(), free_port()
    args = ["--generator", generator, "--clip", clip, "--mapper", mapper, "--backend", backend, "--device", device,
            "--precision", precision, "--max-batch", str(max_batch), "--queue-delay-us", str(queue_delay_us),
            *(["--batch", str(batch)] if batch else []),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
            *(["--grpc-host", "127.0.0.1"] if protocol == "grpc" else [])]          # Triton's gRPC on TCP only when asked
    process = start_server(args, http, threads)
    try:
        url = f"127.0.0.1:{http if protocol == 'http' else grpc}"
        deadline = time.monotonic() + max_seconds

        def inputs(prompt: str, seed: int):
            values = [("prompt", "BYTES", np.array([[prompt.encode()]], dtype=object)), ("seed", "INT64", np.array([[seed]], np.int64)),
                      ("truncation", "FP32", np.array([[truncation]], np.float32))]
            out = []
            for name, dtype, value in values:
                out.append(client_module.InferInput(name, list(value.shape), dtype))
                out[-1].set_data_from_numpy(value)
            return out

        def client(c: int) -> list[float]:
            times = []
            with client_module.InferenceServerClient(url) as triton:
                try:
                    triton.infer("t2f", inputs("a warm-up prompt", c))                  # connection, not timed
                except Exception:
                    barrier.abort()
                    raise
                barrier.wait()
                for m in range(requests):
                    if time.monotonic() > deadline:
                        break
                    t0 = time.perf_counter()
                    result = triton.infer("t2f", inputs(f"a face, client {c}, request {m}", c * requests + m))
                    assert result.as_numpy("image").shape[0] == 1
                    times.append(time.perf_counter() - t0)
            return times

        barrier = threading.Barrier(clients + 1)
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, c) for c in range(clients)]
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                raise click.ClickException(f"a client's first request failed: {[f.exception() for f in futures if f.done()]}") from None
            start = time.perf_counter()
            served_times = [t for f in futures for t in f.result()]
            wall = time.perf_counter() - start
        served = summary(served_times, wall, len(served_times))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        counts = {name: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f'{name}{{model="t2f"'))
                  for name in ("nv_inference_count", "nv_inference_exec_count")}
        served["mean_batch"] = counts["nv_inference_count"] / max(counts["nv_inference_exec_count"], 1)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)

    record = dict(generator=generator, clip=clip, mapper=mapper, backend=backend, device=resolved, precision=precision,
                  clients=clients, requests=requests, protocol=protocol, threads=threads or torch.get_num_threads(),
                  batch=blocks, max_batch=max_batch, queue_delay_us=queue_delay_us,
                  cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), direct_one_by_one=direct_one, direct_batch=direct_batch, served=served)
    rows = [("direct, one image per call", direct_one), (f"direct, {clients} images per call", direct_batch),
            (f"t2f-serve, {clients} clients x {requests} ({protocol})", served)]
    click.echo("| path | requests | p50 ms | p95 ms | p99 ms | images/s |")
    click.echo("|---|---|---|---|---|---|")
    for name, s in rows:
        click.echo(f"| {name} | {s['requests']} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | {s['images_per_s']:.1f} |")
    click.echo(f"mean batch the server formed: {served['mean_batch']:.2f} (warm-up requests included)")
    click.echo(json.dumps(record))
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
