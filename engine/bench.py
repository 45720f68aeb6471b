"""`t2f-bench`: per-stage and end-to-end latency of each backend beside eager PyTorch fp32, with its accuracy against
eager fp32 and its distance to this machine's measured peak.

What the columns time, per backend (its `stage_timing` and `separate_uint8`):
- synthesis: the float image and, where the graph makes it (exported graphs, torch-cudagraph), the uint8 image too;
- uint8_conversion: eager PyTorch's to_uint8 of the float image, a step of its own only where the backend has one
  (`torch`); "in synthesis" elsewhere;
- torch-cudagraph's text_encoder / mapper / synthesis columns time the same modules run eagerly, not the captured
  graph (only end_to_end replays the graph); marked "eager" in the table.
- first_call_ms: the first end-to-end call at that batch (compiles and captures happen here), after `startup_s`,
  the backend's construction (export into the cache, loading, OpenVINO's compile from its cache).

Rounds are interleaved: every backend runs once per round, in turn, so a change of machine load touches all rows
alike (compare rows as ratios). Statistics: the median and the maximum over --iters rounds, p99 only from 100 on.

Accuracy, on the same tokens, z and psi as eager fp32: the embedding's smallest cosine, the ws' largest relative
error, and the uint8 images' mean and max |difference|. Distance to the limit: FLOPs per stage (t2f.engine.roofline,
counted once), achieved GFLOP/s end to end, and its share of the peak measured in this run (a compute-bound GEMM
in fp32, and in the row's precision; measured before and after the rounds, the better of the two).
"""

from __future__ import annotations

import json
import platform
import resource
import time

import click
import numpy as np
import torch

from t2f.cli_errors import nonempty_path
from t2f.presets import TINY

from .config import PipelineConfig, pipeline_options

STAGES = ("tokenize", "text_encoder", "mapper", "synthesis", "uint8_conversion", "device_to_host", "end_to_end")
PROMPTS = ["a photo of an old man with white hair", "a smiling woman with red hair", "a child with curly hair",
           "a man with a beard and glasses"]
P99_MIN_SAMPLES = 100


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


def summarize(samples: list[float]) -> dict:
    """median_ms, max_ms and the sample count; p99_ms only from P99_MIN_SAMPLES samples on."""
    stats = dict(median_ms=float(np.median(samples)), max_ms=float(np.max(samples)), samples=len(samples))
    if len(samples) >= P99_MIN_SAMPLES:
        stats["p99_ms"] = float(np.percentile(samples, 99))
    return stats


class Inputs:
    """The fixed inputs of one batch size: prompts, z and psi on the device."""

    def __init__(self, batch: int, device: torch.device, z_dim: int):
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        self.z = torch.randn([batch, z_dim], generator=torch.Generator().manual_seed(0)).to(device)
        self.psi = torch.full([batch], 0.7, device=device)


def measure(backend, clip, inputs: Inputs, timer: Timer) -> dict:
    """One sample of every stage and of the whole pipeline: {stage: ms or None}."""
    from t2f.stylegan2 import to_uint8

    from .pipeline import to_host

    device = timer.device
    tokens, t_tok = timer(lambda: clip.tokenize(inputs.prompts).to(device, torch.int32))
    e, t_text = timer(lambda: backend.encode(tokens))
    ws, t_map = timer(lambda: backend.map(e, inputs.z, inputs.psi))
    if backend.separate_uint8:
        img, t_syn = timer(lambda: backend.synthesize_float(ws))
        img, t_u8 = timer(lambda: to_uint8(img))
    else:
        img, t_syn = timer(lambda: backend.synthesize(ws))
        t_u8 = None
    _, t_d2h = timer(lambda: to_host(img))
    _, t_e2e = timer(lambda: to_host(backend(clip.tokenize(inputs.prompts).to(device, torch.int32), inputs.z, inputs.psi)))
    return dict(zip(STAGES, (t_tok, t_text, t_map, t_syn, t_u8, t_d2h, t_e2e)))


def outputs(backend, clip, inputs: Inputs) -> dict:
    """(embedding, ws, image) of the fixed inputs on the CPU, for the accuracy columns."""
    from .pipeline import to_host

    tokens = clip.tokenize(inputs.prompts).to(backend.device, torch.int32)
    with torch.no_grad():
        embedding = backend.encode(tokens).float().cpu().clone()
        ws, image = backend.full(tokens, inputs.z, inputs.psi)
        return dict(embedding=embedding, ws=ws.float().cpu().clone(), image=to_host(image))


def accuracy(out: dict, reference: dict) -> dict:
    """The row's outputs against eager fp32's: embedding cosine (smallest), ws relative error (largest), uint8 diff."""
    e, r = out["embedding"].double(), reference["embedding"].double()
    cos = torch.nn.functional.cosine_similarity(e, r, dim=-1).min().item()
    ws, wr = out["ws"].double(), reference["ws"].double()
    ws_err = ((ws - wr).flatten(1).norm(dim=1) / wr.flatten(1).norm(dim=1).clamp_min(1e-12)).max().item()
    d = (out["image"].int() - reference["image"].int()).abs().float()
    return dict(embedding_cosine=cos, ws_relative_error=ws_err, uint8_mean_diff=d.mean().item(), uint8_max_diff=int(d.max().item()))


# ----------------------------------------------------------------------------
# The report.


EAGER_STAGES = ("text_encoder", "mapper", "synthesis")     # the stages an "eager" stage_timing times outside the graph


def _cell(row: dict, stage: str) -> str:
    stats = row["stages"][stage]
    if stats is None:
        return "in synthesis"
    spread = stats.get("p99_ms", stats["max_ms"])
    mark = " eager" if row.get("stage_timing") == "eager" and stage in EAGER_STAGES else ""
    return f"{stats['median_ms']:.2f} ({spread:.2f}){mark}"


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(report: dict) -> str:
    meta = report["meta"]
    spread = "p99" if meta["iters"] >= P99_MIN_SAMPLES else "max"
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in meta.get("peak_gflops", {}).items() if v) or "not measured"
    lines = [f"{meta['date']}, {meta['device_name']}, load {meta.get('load', '?')}, torch {meta['torch']}, {meta['generator']} "
             f"({meta['resolution']} px), CLIP {meta['clip']}; median ({spread}) ms over {meta['iters']} interleaved rounds. "
             f"Measured GEMM peak GFLOP/s: {peaks}. auto picks {meta.get('auto', '?')} here. uint8_conversion: eager to_uint8 "
             f"of the float image, \"in synthesis\" where the graph outputs uint8; \"eager\": that stage timed outside the "
             f"CUDA graph (end_to_end replays it)", "",
             "| backend | precision | batch | " + " | ".join(STAGES) +
             " | images/s | speed-up | startup s | first call ms | GFLOP/s | of fp32 / row peak | emb. cosine | ws rel. err | uint8 mean / max | peak MB |",
             "|" + "---|" * (len(STAGES) + 13)]
    for r in report["results"]:
        cells = [_cell(r, s) for s in STAGES]
        a, d = r.get("accuracy") or {}, r.get("distance") or {}
        acc = (f"{a['embedding_cosine']:.5f} | {a['ws_relative_error']:.1e} | {a['uint8_mean_diff']:.2f} / {a['uint8_max_diff']}"
               if a else "- | - | -")
        mark = " **auto**" if r.get("auto") else ""
        speedup = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['backend']}{mark} | {r['precision']} | {r['batch']} | " + " | ".join(cells) +
                     f" | {r['images_per_s']:.1f} | {speedup} | "
                     f"{r['startup_s']:.1f} | {r['first_call_ms']:.0f} | "
                     f"{d.get('gflops_per_s', 0):.0f} | {_share(d.get('share_of_fp32_peak'))} / {_share(d.get('share_of_peak'))} | "
                     f"{acc} | {r['peak_memory_mb']:.0f} |")
    for s in report["skipped"]:
        where = f" batch {s['batch']}" if "batch" in s else ""
        lines.append(f"\nskipped {s['backend']} ({s['precision']}{where}): {s['reason']}")
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown model")
    except OSError:
        return platform.processor() or "unknown model"


def _load() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def runs_for(names: list[str], device: torch.device, baseline: bool = True) -> list[tuple[str, object]]:
    """(backend, precision) pairs to time: eager fp32 first, then each named backend ("NAME" or "NAME:PRECISION") in
    the precision named, or in every precision it has on this device (those that cannot run here are kept, to be
    listed as skipped with the reason)."""
    from t2f.precision import Precision

    from .backends import BACKEND_CLASSES

    runs = [("torch", Precision.FP32)] if baseline else []
    for entry in names:
        name, _, fixed = entry.partition(":")
        precisions = (Precision(fixed),) if fixed else BACKEND_CLASSES[name].precisions
        runs += [(name, p) for p in precisions if (name, p) not in runs and (fixed or p.runs_on(device) or len(precisions) == 1)]
    return runs


def benchmark(models, device: torch.device, names: list[str], batches: list[int], warmup: int = 3, iters: int = 20,
              artifacts: str | None = None, save=lambda report: None, log=lambda line: None,
              meta: dict | None = None, baseline: bool = True) -> dict:
    """The whole benchmark as a library call: the report dict (see the module docstring). `save(report)` is called
    after every change (an interrupted run keeps what it measured), `log(line)` with progress lines."""
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
    report = dict(meta=dict(meta or {}, date=time.strftime("%Y-%m-%d"), device=str(device), load=_load(),
                            device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"CPU ({_cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads)",
                            torch=torch.__version__, resolution=generator.resolution, clip=clip.name,
                            warmup=warmup, iters=iters, peak_gflops=peak, auto=" ".join(auto) if auto else "nothing",
                            peak_memory=("torch.cuda.max_memory_allocated per run (does not see onnxruntime's or TensorRT's own memory)"
                                         if device.type == "cuda" else "process peak RSS (cumulative)")),
                  results=[], skipped=[])

    def skip(name, precision, reason, batch=None):
        report["skipped"].append(dict(backend=name, precision=str(precision), reason=reason, **({} if batch is None else dict(batch=batch))))
        log(f"skip {name} {precision}{'' if batch is None else f' batch {batch}'}: {reason}")
        save(report)

    inputs = {b: Inputs(b, device, mapper.z_dim) for b in batches}
    flops = {b: roofline.stage_flops(generator, clip, mapper, b) for b in batches}
    # Phase 1: build each backend, its first call and its outputs at each batch.
    live, reference = [], {}
    for name, precision in runs_for(names, device, baseline):
        try:
            start = time.perf_counter()
            backend = make_backend(name, models, device, precision, artifacts)
            startup = time.perf_counter() - start
        except BackendUnavailable as e:
            skip(name, precision, str(e))
            continue
        for batch in batches:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                out, first = timer(lambda: outputs(backend, clip, inputs[batch]))
            except (RuntimeError, ValueError) as e:      # out of memory, outside an engine's profile, a runtime's failure
                skip(name, precision, str(e).splitlines()[0], batch)
                continue
            if (name, precision) == ("torch", Precision.FP32):
                reference[batch] = out
            if baseline and batch not in reference:
                continue
            live.append(dict(backend=backend, name=name, precision=precision, batch=batch, startup_s=startup, first_call_ms=first,
                             accuracy=accuracy(out, reference[batch]) if batch in reference else None,
                             samples={s: [] for s in STAGES}))
    # Phase 2: interleaved rounds.
    for i in range(warmup + iters):
        for run in list(live):
            try:
                times = measure(run["backend"], clip, inputs[run["batch"]], timer)
            except (RuntimeError, ValueError) as e:
                skip(run["name"], run["precision"], str(e).splitlines()[0], run["batch"])
                live.remove(run)
                continue
            if i >= warmup:
                for stage, t in times.items():
                    run["samples"][stage].append(t)
        if i >= warmup:
            report["results"] = _rows(live, flops, peak, auto, device)
            save(report)
    # The peak again after the rounds (the machine's load may have changed): the better of the two counts.
    for p in (Precision.FP32, Precision.BF16, Precision.FP16):
        again = roofline.peak_gflops(device, p.dtype)
        if again is not None and (peak[str(p)] is None or again > peak[str(p)]):
            peak[str(p)] = again
    report["results"] = _rows(live, flops, peak, auto, device)
    save(report)
    for row in report["results"]:
        log(f"{row['backend']:20s} {row['precision']}  batch {row['batch']:3d}  {row['stages']['end_to_end']['median_ms']:9.2f} ms  "
            f"{row['images_per_s']:8.1f} images/s")
    return report


def _row(run: dict, flops: dict, peak: dict, auto, device) -> dict:
    from . import roofline

    stages = {s: None if not v or v[0] is None else summarize(v) for s, v in run["samples"].items()}
    e2e = stages["end_to_end"]["median_ms"]
    batch, precision = run["batch"], str(run["precision"])
    peak_mb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    dist = roofline.distance(flops[batch]["end_to_end"], e2e, peak.get(precision) or peak["fp32"])
    dist["share_of_fp32_peak"] = roofline.distance(flops[batch]["end_to_end"], e2e, peak["fp32"])["share_of_peak"]
    dist["stages"] = {s: roofline.distance(flops[batch][s], stages[s]["median_ms"], peak.get(precision) or peak["fp32"])
                      for s in ("text_encoder", "mapper", "synthesis") if stages[s] is not None and flops[batch][s] > 0}
    dist["gflop"] = {s: f / 1e9 for s, f in flops[batch].items()}
    return dict(backend=run["name"], precision=precision, batch=batch, stages=stages, stage_timing=run["backend"].stage_timing,
                graph_precisions={g: str(p) for g, p in run["backend"].graph_precisions.items()},
                images_per_s=batch / e2e * 1000, startup_s=run["startup_s"], first_call_ms=run["first_call_ms"],
                accuracy=run["accuracy"], distance=dist, peak_memory_mb=peak_mb,
                auto=auto == (run["name"], precision))


def _rows(live: list, flops: dict, peak: dict, auto, device) -> list[dict]:
    """The report's rows of the runs so far, each with its speed-up over eager fp32 at its batch (None without one)."""
    rows = [_row(run, flops, peak, auto, device) for run in live]
    _speedups(rows)
    return rows


def _speedups(rows: list[dict]) -> None:
    eager = {r["batch"]: r["stages"]["end_to_end"]["median_ms"] for r in rows
             if (r["backend"], r["precision"]) == ("torch", "fp32")}
    for r in rows:
        r["speedup"] = eager[r["batch"]] / r["stages"]["end_to_end"]["median_ms"] if r["batch"] in eager else None


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
    from .backends import BACKENDS

    from t2f.precision import PRECISIONS

    names = list(BACKENDS) if value == "all" else [b.strip() for b in value.split(",")]
    unknown = [b for b in names if b.partition(":")[0] not in BACKENDS]
    if unknown:
        raise click.BadParameter(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    odd = [b for b in names if b.partition(":")[2] not in ("",) + PRECISIONS]
    if odd:
        raise click.BadParameter(f"unknown precision in {odd}; NAME:PRECISION takes one of {', '.join(PRECISIONS)}")
    return names


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@pipeline_options(runtime=False, mapper_default=TINY)
@click.option("--backends",   help="Comma-separated backends (NAME or NAME:PRECISION) beside eager fp32, or all", metavar="LIST", default="all", show_default=True, callback=_backends)
@click.option("--batches",    help="Comma-separated batch sizes", metavar="LIST", default="1,8,32", show_default=True, callback=_batches)
@click.option("--warmup",     help="Untimed rounds first", metavar="INT", type=click.IntRange(0, 1000), default=3, show_default=True)
@click.option("--iters",      help="Timed rounds", metavar="INT", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--baseline/--no-baseline", help="Eager fp32 first (speed-up and accuracy columns); off where it does not fit in memory", default=True, show_default=True)
@click.option("--json", "json_path", help="Write the report as JSON", metavar="PATH", type=click.Path(dir_okay=False), callback=nonempty_path)
@click.option("--markdown", "md_path", help="Write the table as markdown", metavar="PATH", type=click.Path(dir_okay=False), callback=nonempty_path)
def main(config: PipelineConfig, backends, batches, warmup, iters, baseline, json_path, md_path):
    """Time tokenize, text encoder, mapper, synthesis, uint8 conversion, device-to-host and end to end.

    The models: --mapper (tiny by default: random weights are fine for timing) and the generator and CLIP
    it was trained for, or --generator / --clip (with --mapper tiny, any: its random weights fit them).

    \b
    Examples:
    t2f-bench                                                     # tiny models, CPU
    t2f-bench --generator random-256 --clip ViT-B-32:random --batches 1,8
    t2f-bench --generator random-1024 --clip ViT-B-32:random --device cuda --artifacts engines/ffhq
    """
    from t2f.cli_errors import user_errors
    from t2f.devices import resolve_device
    from t2f.graphs import ExportError
    from t2f.cli_errors import check_writable, write_files
    from t2f.sources import load_models

    from .backends import BackendUnavailable, Models

    for path, param in ((json_path, "--json"), (md_path, "--markdown")):
        if path is not None:
            check_writable(path, param)

    def save(report: dict) -> None:
        """The report so far, JSON and markdown, rewritten after every change: an interrupted run keeps its rows."""
        files = {}
        if md_path:
            files[md_path] = markdown(report).encode()
        if json_path:
            files[json_path] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
        if files:
            write_files(files)

    with user_errors(OSError, BackendUnavailable, ExportError):
        dev = resolve_device(config.device)
        G, C, M, resolved = load_models(config.models)
        report = benchmark(Models(G, C, M), dev, backends, batches, warmup, iters, config.artifacts, save=save,
                           log=lambda line: click.echo(line, err=True), meta=dict(generator=resolved.generator), baseline=baseline)
        save(report)
        click.echo(markdown(report))


if __name__ == "__main__":
    main()
