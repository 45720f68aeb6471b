"""Memory of t2f's processes on the CPU with `--backend auto`: t2f-infer's peak, and t2f-serve's processes after a request.

    python benchmarks/memory.py                                         # random-256 and random-1024, ViT-B-32:random
    python benchmarks/memory.py --generators random-256 --no-serve --json memory-256.json

t2f-infer: the peak resident memory (the kernel's ru_maxrss of the process, what /usr/bin/time's %M reports) of
`t2f-infer --mapper MAPPER --generator GEN --clip CLIP --n 1 "a smiling woman"` on the CPU with backend and precision
auto, first in an empty T2F_CACHE ("cold": the ONNX export and OpenVINO's compile happen in that process), then again
("warm": both come from the cache). t2f-serve (with --serve, the default): the resident memory (VmRSS) of each of its
processes, the front, tritonserver and one Python stub per model, one second after one request to the front, with
the cache the t2f-infer runs left warm. Each generator gets a fresh cache folder under --work (a temporary folder,
removed at the end, unless given). Prints a markdown table and one JSON object (written with --json).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import click
from serve_load import free_port, start_server

from t2f.devices import cpu_model, load_average
from t2f.files import atomic_path
from t2f.precision import cpu_has_bf16

PROMPT = "a smiling woman"


def peak_rss(args: list[str], env: dict, cwd: str) -> tuple[int, int, str]:
    """(exit code, peak RSS in KiB, last line of its output) of a command run to its end."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = log.read().strip().splitlines()
    return process.returncode, usage.ru_maxrss, lines[-1] if lines else ""


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc's parent ids)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += [child for child, parent in parents.items() if parent == found[-1]]
    return found


def process_memory(pid: int) -> dict | None:
    """{"process": what it is, "rss_mib": its VmRSS} of a live process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    text = " ".join(args)
    if "triton_python_backend_stub" in text:
        model = next((m for m in ("t2f_image", "t2f") if f"/{m}/" in text), "?")
        name = f"Python stub ({model})"
    elif "tritonserver" in os.path.basename(args[0] if args else ""):
        name = "tritonserver"
    elif "t2f.engine.serve" in text or "t2f-serve" in text:
        name = "t2f-serve (front)"
    else:
        name = os.path.basename(args[0]) if args else "?"
    return dict(process=name, pid=pid, rss_mib=round(rss / 1024))


def serve_memory(models: list[str], env: dict) -> list[dict]:
    """The resident memory of t2f-serve's processes one second after one request of the front."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    process = start_server([*models, "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                           http, threads=0, env=env)
    try:
        body = json.dumps({"inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": [PROMPT]},
            {"name": "seed", "datatype": "INT64", "shape": [1, 1], "data": [0]},
            {"name": "truncation", "datatype": "FP32", "shape": [1, 1], "data": [0.7]}], "outputs": [{"name": "ws"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/t2f/infer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            if response.status != 200:
                raise click.ClickException(f"the request failed: HTTP {response.status}")
        time.sleep(1)
        return [m for m in (process_memory(p) for p in descendants(process.pid)) if m]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


@click.command()
@click.option("--generators", help="Comma-separated generators", default="random-256,random-1024", show_default=True)
@click.option("--clip",       default="ViT-B-32:random", show_default=True)
@click.option("--mapper",     default="tiny", show_default=True)
@click.option("--serve/--no-serve", help="Also measure t2f-serve's processes", default=True, show_default=True)
@click.option("--work",       help="Folder for the caches and images [default: a temporary folder, removed after]",
              type=click.Path(file_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
def main(generators, clip, mapper, serve, work, json_path):
    keep, load_at_start = work is not None, load_average()
    work = os.path.abspath(work) if keep else tempfile.mkdtemp(prefix="t2f-memory-")
    os.makedirs(work, exist_ok=True)
    infer, served = [], []
    try:
        for generator in [g.strip() for g in generators.split(",") if g.strip()]:
            cache = os.path.join(work, f"cache-{generator}")
            if os.path.lexists(cache):                     # the first run must find an empty cache: cold
                raise click.ClickException(f"{cache} exists: give --work a folder without it")
            os.makedirs(cache)
            env = dict(os.environ, T2F_CACHE=cache)
            models = ["--mapper", mapper, "--generator", generator, "--clip", clip]
            for run in ("cold", "warm"):
                rc, kib, last = peak_rss([sys.executable, "-m", "t2f.engine.cli", *models, "--n", "1", "--device", "cpu",
                                          "--out", os.path.join(work, f"{generator}-{run}.png"), PROMPT], env, work)
                if rc:
                    raise click.ClickException(f"t2f-infer {generator} ({run}) exited {rc}: {last}")
                infer.append(dict(generator=generator, run=run, peak_rss_kib=kib, peak_rss_mib=round(kib / 1024), summary=last))
                click.echo(f"t2f-infer {generator} {run}: peak RSS {kib} KiB ({kib / 1024:.0f} MiB); {last}", err=True)
            if serve:
                for m in serve_memory([*models, "--device", "cpu"], dict(T2F_CACHE=cache)):
                    served.append(dict(generator=generator, **m))
                    click.echo(f"t2f-serve {generator}: {m['process']} {m['rss_mib']} MiB", err=True)
    finally:
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    record = dict(date=time.strftime("%Y-%m-%d"), cpu=cpu_model(), cpu_bf16=cpu_has_bf16(), cores=os.cpu_count(),
                  load_at_start=load_at_start, clip=clip, mapper=mapper, t2f_infer=infer, t2f_serve=served)
    click.echo("| process | generator | cache | MiB |")
    click.echo("|---|---|---|---|")
    for r in infer:
        click.echo(f"| t2f-infer (peak RSS) | {r['generator']} | {r['run']} | {r['peak_rss_mib']} |")
    for r in served:
        click.echo(f"| t2f-serve: {r['process']} (RSS after one request) | {r['generator']} | warm | {r['rss_mib']} |")
    click.echo(json.dumps(record))
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
