"""`t2f-bench`: per-stage and end-to-end latency of each backend beside eager PyTorch fp32.

What the columns time, per backend (its `stage_timing` and `separate_uint8`):
- synthesis: the float image and, where the graph makes it (exported graphs, torch-cudagraph), the uint8 image too;
- uint8_conversion: eager PyTorch's to_uint8 of the float image, a step of its own only where the backend has one
  (`torch`); "in synthesis" elsewhere;
- torch-cudagraph's text_encoder / mapper / synthesis columns time the same modules run eagerly, not the captured
  graph (only end_to_end replays the graph); marked "eager" in the table.
Statistics: the median and the maximum of --iters samples, and p99 only from 100 samples on (below that a
99th percentile is the maximum under another name).
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

STAGES = ("tokenize", "text_encoder", "mapper", "synthesis", "uint8_conversion", "device_to_host", "end_to_end")
PROMPTS = ["a photo of an old man with white hair", "a smiling woman with red hair", "a child with curly hair",
           "a man with a beard and glasses"]


class Timer:
    """Milliseconds of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1000


P99_MIN_SAMPLES = 100


def summarize(samples: list[float]) -> dict:
    """median_ms, max_ms and the sample count; p99_ms only from P99_MIN_SAMPLES samples on."""
    stats = dict(median_ms=float(np.median(samples)), max_ms=float(np.max(samples)), samples=len(samples))
    if len(samples) >= P99_MIN_SAMPLES:
        stats["p99_ms"] = float(np.percentile(samples, 99))
    return stats


def measure(backend, clip, batch: int, warmup: int, iters: int, device: torch.device, z_dim: int) -> dict:
    """Per-stage and end-to-end times of one backend at one batch size: {stage: summarize(...) or None}."""
    from t2f.stylegan2 import to_uint8

    from .pipeline import to_host

    timer = Timer(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    z = torch.randn([batch, z_dim], generator=torch.Generator().manual_seed(0)).to(device)
    psi = torch.full([batch], 0.7, device=device)
    times = {s: [] for s in STAGES}
    for i in range(warmup + iters):
        record = i >= warmup
        tokens, t_tok = timer(lambda: clip.tokenize(prompts).to(device, torch.int32))
        e, t_text = timer(lambda: backend.encode(tokens))
        ws, t_map = timer(lambda: backend.map(e, z, psi))
        if backend.separate_uint8:
            img, t_syn = timer(lambda: backend.synthesize_float(ws))
            img, t_u8 = timer(lambda: to_uint8(img))
        else:
            img, t_syn = timer(lambda: backend.synthesize(ws))
            t_u8 = None
        _, t_d2h = timer(lambda: to_host(img))
        _, t_e2e = timer(lambda: to_host(backend(clip.tokenize(prompts).to(device, torch.int32), z, psi)))
        if record:
            for stage, t in zip(STAGES, (t_tok, t_text, t_map, t_syn, t_u8, t_d2h, t_e2e)):
                times[stage].append(t)
    return {s: None if not v or v[0] is None else summarize(v) for s, v in times.items()}


EAGER_STAGES = ("text_encoder", "mapper", "synthesis")     # the stages an "eager" stage_timing times outside the graph


def _cell(row: dict, stage: str) -> str:
    stats = row["stages"][stage]
    if stats is None:
        return "in synthesis"
    spread = stats.get("p99_ms", stats["max_ms"])
    mark = " eager" if row.get("stage_timing") == "eager" and stage in EAGER_STAGES else ""
    return f"{stats['median_ms']:.2f} ({spread:.2f}){mark}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    spread = "p99" if meta["iters"] >= P99_MIN_SAMPLES else "max"
    lines = [f"{meta['date']}, {meta['device_name']}, torch {meta['torch']}, {meta['generator']} ({meta['resolution']} px), "
             f"CLIP {meta['clip']}; median ({spread}) ms over {meta['iters']} runs. uint8_conversion: eager to_uint8 of the "
             f"float image, \"in synthesis\" where the graph outputs uint8; \"eager\": that stage timed outside the CUDA graph "
             f"(end_to_end replays it)", "",
             "| backend | precision | batch | " + " | ".join(STAGES) + " | images/s | peak MB | speed-up |",
             "|" + "---|" * (len(STAGES) + 6)]
    for r in report["results"]:
        cells = [_cell(r, s) for s in STAGES]
        lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | " + " | ".join(cells) +
                     f" | {r['images_per_s']:.1f} | {r['peak_memory_mb']:.0f} | {r['speedup']:.2f}x |")
    for s in report["skipped"]:
        where = f" batch {s['batch']}" if "batch" in s else ""
        lines.append(f"\nskipped {s['backend']} ({s['precision']}{where}): {s['reason']}")
    return "\n".join(lines) + "\n"


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--generator",  help="Generator", metavar="NAME|PATH", default="tiny", show_default=True)
@click.option("--clip",       help="CLIP", metavar="SPEC", default="tiny", show_default=True)
@click.option("--mapper",     help="Mapper directory or tiny (random weights are fine for timing)", metavar="DIR|NAME", default="tiny", show_default=True)
@click.option("--backends",   help="Comma-separated backends beside eager fp32, or all", metavar="LIST", default="all", show_default=True)
@click.option("--batches",    help="Comma-separated batch sizes", metavar="LIST", default="1,8,32", show_default=True)
@click.option("--warmup",     help="Untimed runs first", metavar="INT", type=click.IntRange(0, 1000), default=3, show_default=True)
@click.option("--iters",      help="Timed runs", metavar="INT", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--device",     help="auto, cpu, cuda or cuda:N", metavar="STR", default="auto", show_default=True)
@click.option("--artifacts",  help="t2f-export output (needed for tensorrt)", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--json", "json_path", help="Write the report as JSON", metavar="PATH", type=click.Path(dir_okay=False), callback=nonempty_path)
@click.option("--markdown", "md_path", help="Write the table as markdown", metavar="PATH", type=click.Path(dir_okay=False), callback=nonempty_path)
def main(generator, clip, mapper, backends, batches, warmup, iters, device, artifacts, json_path, md_path):
    """Time tokenize, text encoder, mapper, synthesis, uint8 conversion, device-to-host and end to end.

    \b
    Examples:
    t2f-bench                                                     # tiny models, CPU
    t2f-bench --generator random-256 --clip ViT-B-32:random --batches 1,8
    t2f-bench --generator random-1024 --clip ViT-B-32:random --device cuda --artifacts engines/ffhq
    """
    import t2f
    from t2f.cli_errors import user_errors
    from t2f.devices import resolve_device
    from t2f.graphs import ExportError
    from t2f.precision import Precision
    from t2f.presets import load_mapper

    from .backends import BACKEND_CLASSES, BACKENDS, BackendUnavailable, make_backend
    from .cli import _check_writable, _write_all

    try:
        sizes = sorted({int(b) for b in batches.split(",")})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {batches!r}", param_hint="--batches") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 1024:
        raise click.BadParameter("batch sizes must be from 1 to 1024", param_hint="--batches")
    names = list(BACKENDS) if backends == "all" else [b.strip() for b in backends.split(",")]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise click.BadParameter(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}", param_hint="--backends")
    for path, param in ((json_path, "--json"), (md_path, "--markdown")):
        if path is not None:
            _check_writable(path, param)
    with user_errors(OSError):
        dev = resolve_device(device)
        G = t2f.load_generator(generator)
        C = t2f.load_clip(clip)
        M = load_mapper(mapper, G, generator, C)
        runs = [("torch", Precision.FP32)]               # the baseline, always first
        for name in names:
            precisions = BACKEND_CLASSES[name].precisions        # those that run here; a backend with none is listed as skipped
            runs += [(name, p) for p in precisions if (name, p) != ("torch", Precision.FP32) and (p.runs_on(dev) or len(precisions) == 1)]
        report = dict(meta=dict(date=time.strftime("%Y-%m-%d"), device=str(dev),
                                device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
                                torch=torch.__version__, generator=generator, resolution=G.resolution, clip=C.name,
                                warmup=warmup, iters=iters,
                                peak_memory=("torch.cuda.max_memory_allocated per run (does not see onnxruntime's or TensorRT's own memory)"
                                             if dev.type == "cuda" else "process peak RSS (cumulative)")),
                      results=[], skipped=[])

        def save() -> None:
            """The report so far, JSON and markdown, rewritten after every row: an interrupted run keeps its rows."""
            files = {}
            if md_path:
                files[md_path] = markdown(report).encode()
            if json_path:
                files[json_path] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
            if files:
                _write_all(files)

        def skip(name, precision, reason, batch=None):
            entry = dict(backend=name, precision=str(precision), reason=reason, **({} if batch is None else dict(batch=batch)))
            report["skipped"].append(entry)
            click.echo(f"skip {name} {precision}{'' if batch is None else f' batch {batch}'}: {reason}", err=True)
            save()

        baseline = {}
        for name, precision in runs:
            try:
                backend = make_backend(name, G, C, M, dev, precision, artifacts)
            except (BackendUnavailable, ExportError) as e:
                skip(name, precision, str(e))
                continue
            for batch in sizes:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                try:
                    stages = measure(backend, C, batch, warmup, iters, dev, M.z_dim)
                except (RuntimeError, ValueError) as e:   # out of memory, outside an engine's profile, ...
                    skip(name, precision, str(e).splitlines()[0], batch)
                    continue
                e2e = stages["end_to_end"]["median_ms"]
                if name == "torch" and precision == Precision.FP32:
                    baseline[batch] = e2e
                if batch not in baseline:
                    continue
                peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
                report["results"].append(dict(backend=name, precision=str(precision), batch=batch, stages=stages,
                                              stage_timing=backend.stage_timing, images_per_s=batch / e2e * 1000,
                                              peak_memory_mb=peak, speedup=baseline[batch] / e2e))
                save()
                click.echo(f"{name:20s} {precision}  batch {batch:3d}  {e2e:9.2f} ms  {batch / e2e * 1000:8.1f} images/s  "
                           f"{baseline[batch] / e2e:5.2f}x", err=True)
            del backend
        click.echo(markdown(report))
        save()


if __name__ == "__main__":
    main()
