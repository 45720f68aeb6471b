"""`t2f-bench`: per-stage and end-to-end latency of each backend beside eager PyTorch fp32, with its accuracy against
eager fp32 and its distance to this machine's measured peak.

What the columns time, per backend (its `stage_timing` and `separate_uint8`):
- synthesis: the float image and, where the graph makes it (exported graphs, torch-cudagraph), the uint8 image too;
- uint8_conversion: eager PyTorch's to_uint8 of the float image, a step of its own only where the backend has one
  (`torch`); "in synthesis" elsewhere;
- torch-cudagraph's text_encoder / mapper / synthesis columns time the same modules run eagerly, not the captured
  graph (only end_to_end replays the graph); marked "eager" in the table;
- with --no-stages only tokenize and end_to_end are timed (torch-compile then compiles the whole pipeline only);
- first_call_ms: the first end-to-end call at that batch (compiles and captures happen here), after `startup_s`,
  the backend's construction (export into the cache, loading, OpenVINO's compile from its cache).

Order: every backend is built, then each batch's first calls run row by row; a row is written (provisional: the
median of PROVISIONAL_CALLS calls right after its first) as soon as its first call returns. Then the timed rounds
are interleaved: every row runs once per round, in turn, so a change of machine load touches all rows alike (compare
rows as ratios); the rows are rewritten after every round. Statistics: the median and the maximum over --iters
rounds, p99 only from 100 on. A row whose call raises is listed as skipped with the error (and, where its first call
had returned, keeps what it measured, with the error); the others go on.

Baselines: eager fp32 with t2f's numerics (the speed-up and accuracy columns) and, on CUDA, eager fp32 with PyTorch's
defaults and cudnn.benchmark (t2f.devices.PYTORCH_DEFAULTS; "vs defaults"), whose flags are set around each of its
calls and restored after, so the rows beside it keep t2f's pinned numerics.

Accuracy, on the same tokens, z and psi as eager fp32: the embedding's smallest cosine, the ws' largest relative
error, and the uint8 images' mean and max |difference|. Distance to the limit: FLOPs per stage (t2f.engine.roofline,
counted once), achieved GFLOP/s end to end, and its share of the peak measured in this run (a compute-bound GEMM
in fp32, and in the row's precision; measured before and after the rounds, the better of the two). Memory per row:
see `benchreport.Memory`.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time

import click
import torch

from t2f.cli import nonempty_path
from t2f.devices import cpu_model, load_average
from t2f.errors import first_line
from t2f.presets import TINY

from .config import PipelineConfig, pipeline_options

from .benchreport import BASELINE, DEFAULTS, STAGES, Memory, Run, markdown, row_accuracy, rows

PROMPTS = ["a photo of an old man with white hair", "a smiling woman with red hair", "a child with curly hair",
           "a man with a beard and glasses"]
PROVISIONAL_CALLS = 3           # calls right after the first, for a row's provisional numbers (a CUDA graph tree's
                                # second call records, its third replays)


class Timer:
    """Milliseconds of a callable: CUDA events on `device`'s current stream (made current first) on a GPU, else
    perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, (time.perf_counter() - t0) * 1000
        with torch.cuda.device(self.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)
            start.record(stream)
            out = fn()
            end.record(stream)
            end.synchronize()
            return out, start.elapsed_time(end)


class Inputs:
    """The fixed inputs of one batch size: prompts, z and psi on the device."""

    def __init__(self, batch: int, device: torch.device, z_dim: int):
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        self.z = torch.randn([batch, z_dim], generator=torch.Generator().manual_seed(0)).to(device)
        self.psi = torch.full([batch], 0.7, device=device)


def measure(backend, clip, inputs: Inputs, timer: Timer, stages: bool = True) -> dict:
    """One sample of every stage (tokenize and end_to_end only without `stages`) and of the whole pipeline:
    {stage: ms or None}."""
    from t2f.stylegan2 import to_uint8

    from .pipeline import to_host

    device = timer.device
    tokens, t_tok = timer(lambda: clip.tokenize(inputs.prompts).to(device, torch.int32))
    t_text = t_map = t_syn = t_u8 = t_d2h = None
    if stages:
        e, t_text = timer(lambda: backend.encode(tokens))
        ws, t_map = timer(lambda: backend.map(e, inputs.z, inputs.psi))
        if backend.separate_uint8:
            img, t_syn = timer(lambda: backend.synthesize_float(ws))
            img, t_u8 = timer(lambda: to_uint8(img))
        else:
            img, t_syn = timer(lambda: backend.synthesize(ws))
        _, t_d2h = timer(lambda: to_host(img))
    _, t_e2e = timer(lambda: to_host(backend(clip.tokenize(inputs.prompts).to(device, torch.int32), inputs.z, inputs.psi)))
    return dict(zip(STAGES, (t_tok, t_text, t_map, t_syn, t_u8, t_d2h, t_e2e)))


def outputs(backend, clip, inputs: Inputs, stages: bool = True) -> dict:
    """(embedding, ws, image) of the fixed inputs on the CPU, for the accuracy columns (no embedding without `stages`:
    it would take the text encoder's own call)."""
    from .pipeline import to_host

    tokens = clip.tokenize(inputs.prompts).to(backend.device, torch.int32)
    with torch.no_grad():
        embedding = backend.encode(tokens).float().cpu().clone() if stages else None
        ws, image = backend.full(tokens, inputs.z, inputs.psi)
        return dict(embedding=embedding, ws=ws.float().cpu().clone(), image=to_host(image))


def runs_for(names: list[str], device: torch.device, baseline: bool = True, memory_formats=("nchw",)) -> list[Run]:
    """What to time: the baselines first (eager fp32 with t2f's numerics, and on CUDA with PyTorch's defaults), then
    each named backend ("NAME" or "NAME:PRECISION") in the precision named, or in every precision it has on this
    device, in each memory format asked for (those that cannot run here are kept, to be listed as skipped with the
    reason)."""
    from t2f.precision import Precision

    from .backends import BACKEND_CLASSES

    runs = ([BASELINE] + ([DEFAULTS] if device.type == "cuda" else [])) if baseline else []
    for entry in names:
        name, _, fixed = entry.partition(":")
        precisions = (Precision(fixed),) if fixed else BACKEND_CLASSES[name].precisions
        runs += [Run(name, p, fmt) for p in precisions for fmt in memory_formats
                 if Run(name, p, fmt) not in runs and (fixed or p.runs_on(device) or len(precisions) == 1)]
    return runs


def benchmark(models, device: torch.device, names: list[str], batches: list[int], warmup: int = 3, iters: int = 20,
              artifacts: str | None = None, save=lambda report: None, log=lambda line: None,
              meta: dict | None = None, baseline: bool = True, memory_formats=("nchw",), stages: bool = True) -> dict:
    """The whole benchmark as a library call: the report dict (see the module docstring). `save(report)` is called
    after every change (an interrupted run keeps what it measured), `log(line)` with progress lines."""
    from t2f.devices import PYTORCH_DEFAULTS, cuda_numerics, numerics
    from t2f.precision import Precision

    from . import roofline
    from .backends import BackendUnavailable, choose, make_backend

    generator, clip, mapper = models
    timer = Timer(device)
    peak = {str(p): roofline.peak_gflops(device, p.dtype) for p in (Precision.FP32, Precision.BF16, Precision.FP16)}
    try:
        cls, p = choose(device, "auto", None, artifacts, models=models)
        auto = (cls.name, str(p))
    except BackendUnavailable:
        auto = None
    report = dict(meta=dict(meta or {}, date=time.strftime("%Y-%m-%d"), device=str(device), load=load_average(),
                            device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"CPU ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)",
                            torch=torch.__version__, resolution=generator.resolution, clip=clip.name, stages=stages,
                            warmup=warmup, iters=iters, peak_gflops=peak, auto=" ".join(auto) if auto else "nothing",
                            peak_memory=("torch's allocator, per row: peak MB = the process-wide peak during the row's "
                                         "calls (each after a reset), call MB = that peak less what was allocated before "
                                         "the call; onnxruntime's and TensorRT's own memory not seen"
                                         if device.type == "cuda" else "process peak RSS (cumulative)")),
                  results=[], skipped=[])

    def skip(run: Run, reason: str, batch=None):
        report["skipped"].append(dict(run.fields(), label=run.label, reason=reason, **({} if batch is None else dict(batch=batch))))
        log(f"skip {run.label} {run.precision}{'' if batch is None else f' batch {batch}'}: {reason}")
        save(report)

    def calls(run: Run):
        """Where `run`'s calls happen: PyTorch's default numerics around the defaults baseline, nothing otherwise."""
        return numerics(PYTORCH_DEFAULTS) if run.numerics == "pytorch-defaults" else contextlib.nullcontext()

    inputs = {b: Inputs(b, device, mapper.z_dim) for b in batches}
    flops = {b: roofline.stage_flops(generator, clip, mapper, b) for b in batches}
    # Phase 1: build each backend, once per (name, precision, memory format): rows that differ by their numerics alone
    # (the two fp32 baselines) share it, so no stage module is held twice (on CUDA a second synthesis copy would count
    # in every row's peak memory), and report its construction time alike.
    built, backends = [], {}            # backends: key -> (backend, startup s) or the reason it could not be built
    for run in runs_for(names, device, baseline, memory_formats):
        key = (run.name, run.precision, run.memory_format)
        if key not in backends:
            try:
                start = time.perf_counter()
                backend = make_backend(run.name, models, device, run.precision, artifacts, memory_format=run.memory_format)
                backends[key] = (backend, time.perf_counter() - start)
            except BackendUnavailable as e:
                backends[key] = str(e)
            except Exception as e:              # a backend that fails to build never loses the other rows
                backends[key] = first_line(e, typed=True)
        if isinstance(backends[key], str):
            skip(run, backends[key])
        else:
            built.append((run, *backends[key]))
    # Phase 2: batch by batch, each row's first call (and its provisional numbers), written as soon as it returns.
    live, reference = [], {}
    for batch in batches:
        for run, backend, startup in built:
            try:
                with calls(run), Memory(device) as first_memory:
                    out, first = timer(lambda: outputs(backend, clip, inputs[batch], stages))
                    flags = cuda_numerics() if device.type == "cuda" else None          # what this row ran with
                    provisional = [measure(backend, clip, inputs[batch], timer, stages) for _ in range(PROVISIONAL_CALLS)]
            except Exception as e:              # out of memory, outside an engine's profile, a runtime's or compiler's failure
                skip(run, first_line(e, typed=True), batch)
                continue
            if run == BASELINE:
                reference[batch] = out
            live.append(dict(run=run, backend=backend, batch=batch, startup_s=startup, first_call_ms=first, error=None,
                             first_memory=first_memory, memory=Memory(device), stages_timed=stages,
                             cuda_numerics=flags, accuracy=row_accuracy(out, reference.get(batch)),
                             provisional={s: [t[s] for t in provisional] for s in STAGES}, samples={s: [] for s in STAGES}))
            report["results"] = rows(live, flops, peak, auto)
            save(report)
    # Phase 3: interleaved rounds. A row whose call raises stops there, keeping what it measured.
    for i in range(warmup + iters):
        for run in live:
            if run["error"]:
                continue
            try:
                with calls(run["run"]), run["memory"]:
                    times = measure(run["backend"], clip, inputs[run["batch"]], timer, stages)
            except Exception as e:
                run["error"] = first_line(e, typed=True)
                skip(run["run"], run["error"], run["batch"])
                continue
            if i >= warmup:
                for stage, t in times.items():
                    run["samples"][stage].append(t)
        if i >= warmup:
            report["results"] = rows(live, flops, peak, auto)
            save(report)
    # The peak again after the rounds (the machine's load may have changed): the better of the two counts.
    for p in (Precision.FP32, Precision.BF16, Precision.FP16):
        again = roofline.peak_gflops(device, p.dtype)
        if again is not None and (peak[str(p)] is None or again > peak[str(p)]):
            peak[str(p)] = again
    report["results"] = rows(live, flops, peak, auto)
    save(report)
    for r in report["results"]:
        log(f"{r['label']:30s} {r['precision']}  batch {r['batch']:3d}  {r['stages']['end_to_end']['median_ms']:9.2f} ms  "
            f"{r['images_per_s']:8.1f} images/s")
    return report


# ----------------------------------------------------------------------------
# The command.


def _batches(ctx, param, value: str) -> list[int]:
    try:
        sizes = sorted({int(b) for b in value.split(",")})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 1024:
        raise click.BadParameter("batch sizes must be from 1 to 1024")
    return sizes


def _backends(ctx, param, value: str) -> list[str]:
    from .backends import backend_names

    from t2f.precision import PRECISIONS

    known = backend_names()
    names = list(known) if value == "all" else [b.strip() for b in value.split(",")]
    unknown = [b for b in names if b.partition(":")[0] not in known]
    if unknown:
        raise click.BadParameter(f"unknown backends {unknown}; choose from {', '.join(known)}")
    odd = [b for b in names if b.partition(":")[2] not in ("",) + PRECISIONS]
    if odd:
        raise click.BadParameter(f"unknown precision in {odd}; NAME:PRECISION takes one of {', '.join(PRECISIONS)}")
    return names


def _memory_formats(ctx, param, value: str) -> list[str]:
    from .backends import MEMORY_FORMATS

    formats = list(dict.fromkeys(f.strip() for f in value.split(",")))
    odd = [f for f in formats if f not in MEMORY_FORMATS]
    if odd or not formats:
        raise click.BadParameter(f"unknown memory formats {odd}; choose from {', '.join(MEMORY_FORMATS)}")
    return formats


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@pipeline_options(runtime=False, mapper_default=TINY)
@click.option("--backends",   help="Comma-separated backends (NAME or NAME:PRECISION) beside eager fp32, or all", metavar="LIST", default="all", show_default=True, callback=_backends)
@click.option("--batches",    help="Comma-separated batch sizes", metavar="LIST", default="1,8,32", show_default=True, callback=_batches)
@click.option("--warmup",     help="Untimed rounds first", metavar="INT", type=click.IntRange(0, 1000), default=3, show_default=True)
@click.option("--iters",      help="Timed rounds", metavar="INT", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--baseline/--no-baseline", help="Eager fp32 first (speed-up and accuracy columns; on CUDA also with PyTorch's defaults); off where it does not fit in memory", default=True, show_default=True)
@click.option("--json", "json_path", help="Write the report as JSON", metavar="PATH", type=click.Path(dir_okay=False), callback=nonempty_path)
@click.option("--markdown", "md_path", help="Write the table as markdown", metavar="PATH", type=click.Path(dir_okay=False), callback=nonempty_path)
@click.option("--memory-formats", help="Comma-separated synthesis layouts to run each backend in: nchw, channels_last (torch backends)", metavar="LIST", default="nchw", show_default=True, callback=_memory_formats)
@click.option("--stages/--no-stages", help="Time each stage too (torch-compile compiles each stage once more for it)", default=True, show_default=True)
def main(config: PipelineConfig, backends, batches, warmup, iters, baseline, json_path, md_path, memory_formats, stages):
    """Time tokenize, text encoder, mapper, synthesis, uint8 conversion, device-to-host and end to end.

    The models: --mapper (tiny by default: random weights are fine for timing) and the generator and CLIP
    it was trained for, or --generator / --clip (with --mapper tiny, any: its random weights fit them).

    \b
    Examples:
    t2f-bench                                                     # tiny models, CPU
    t2f-bench --generator random-256 --clip ViT-B-32:random --batches 1,8
    t2f-bench --generator random-1024 --clip ViT-B-32:random --device cuda --artifacts engines/ffhq
    t2f-bench --generator random-1024 --clip ViT-B-32:random --device cuda --backends torch-compile:fp16 \\
              --batches 1,32 --memory-formats nchw,channels_last --no-stages
    """
    from t2f.cli import check_writable, user_errors, write_files
    from t2f.devices import resolve_device
    from t2f.sources import load_models

    from .backends import Models

    for path, param in ((json_path, "--json"), (md_path, "--markdown")):
        if path is not None:
            check_writable(path, param)

    def save(report: dict) -> None:
        """The report so far, JSON and markdown, rewritten (atomically) after every change: an interrupted run keeps its rows."""
        files = {}
        if md_path:
            files[md_path] = markdown(report).encode()
        if json_path:
            files[json_path] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
        if files:
            write_files(files)

    with user_errors():
        dev = resolve_device(config.device)
        G, C, M, resolved = load_models(config.models)
        report = benchmark(Models(G, C, M), dev, backends, batches, warmup, iters, config.artifacts, save=save,
                           log=lambda line: click.echo(line, err=True), meta=dict(generator=resolved.generator), baseline=baseline,
                           memory_formats=memory_formats, stages=stages)
        save(report)
        click.echo(markdown(report))


if __name__ == "__main__":
    main()
