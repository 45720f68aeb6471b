"""t2f-bench's report: what one row is (`Run`), its statistics, accuracy, speed-ups and memory, and the markdown table.

Pure functions of the samples t2f.engine.bench measures (no timing here), so the report's rules are tested without
running a model.
"""

from __future__ import annotations

import dataclasses
import resource

import numpy as np
import torch

from t2f.accuracy import accuracy
from t2f.precision import Precision

STAGES = ("tokenize", "text_encoder", "mapper", "synthesis", "uint8_conversion", "device_to_host", "end_to_end")
EAGER_STAGES = ("text_encoder", "mapper", "synthesis")     # the stages an "eager" stage_timing times outside the graph
P99_MIN_SAMPLES = 100
NUMERICS = ("t2f", "pytorch-defaults")      # t2f's (on CUDA: pinned, t2f.devices.PINNED) or PyTorch's defaults with
                                            # cudnn.benchmark (t2f.devices.PYTORCH_DEFAULTS): the second fp32 baseline
DEFAULTS_LABEL = "eager fp32, PyTorch defaults (TF32, cudnn.benchmark)"


@dataclasses.dataclass(frozen=True)
class Run:
    """What one series of rows runs: a backend in a precision and memory format, under t2f's CUDA numerics or PyTorch's."""
    name: str
    precision: Precision
    memory_format: str = "nchw"
    numerics: str = "t2f"

    @property
    def label(self) -> str:
        """The row's name in the table (its precision and layout have columns of their own)."""
        return DEFAULTS_LABEL if self.numerics == "pytorch-defaults" else self.name

    def fields(self) -> dict:
        return dict(backend=self.name, precision=str(self.precision), memory_format=self.memory_format, numerics=self.numerics)


BASELINE = Run("torch", Precision.FP32)                    # eager fp32 with t2f's numerics: speed-up and accuracy
DEFAULTS = Run("torch", Precision.FP32, numerics="pytorch-defaults")


def summarize(samples: list[float]) -> dict:
    """median_ms, max_ms and the sample count; p99_ms only from P99_MIN_SAMPLES samples on."""
    stats = dict(median_ms=float(np.median(samples)), max_ms=float(np.max(samples)), samples=len(samples))
    if len(samples) >= P99_MIN_SAMPLES:
        stats["p99_ms"] = float(np.percentile(samples, 99))
    return stats


def row_accuracy(out: dict, reference: dict | None) -> dict | None:
    """A row's outputs (embedding, ws, image) against eager fp32's on the same inputs (t2f.accuracy; a relative error is
    the largest of the batch's rows'); None without a reference row, embedding_cosine None without an embedding."""
    return None if reference is None else {"embedding_cosine": None, **accuracy(out, reference, per_row=True)}


class Memory:
    """A row's GPU memory (torch's caching allocator) over its calls: the process-wide peak during each call (the
    peak statistics reset just before it), and the call's own working memory, that peak less what was allocated
    before the call; CPU: the process's peak RSS, cumulative (it cannot be reset)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.call_mb = device, 0.0, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type != "cuda":
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20
            return False
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.peak_mb = max(self.peak_mb, peak / 2**20)
        self.call_mb = max(self.call_mb or 0.0, (peak - self._before) / 2**20)
        return False


def row(run: dict, flops: dict, peak: dict, auto) -> dict:
    """One row of the report from a live run: its timed samples, or (provisional) the calls right after its first."""
    from . import roofline

    timed = bool(run["samples"]["end_to_end"])
    samples = run["samples"] if timed else run["provisional"]
    stages = {s: None if not v or v[0] is None else summarize(v) for s, v in samples.items()}
    e2e = stages["end_to_end"]["median_ms"]
    spec, batch = run["run"], run["batch"]
    precision = str(spec.precision)
    row_peak = peak.get(precision) or peak["fp32"]
    dist = roofline.distance(flops[batch]["end_to_end"], e2e, row_peak)
    dist["share_of_fp32_peak"] = roofline.distance(flops[batch]["end_to_end"], e2e, peak["fp32"])["share_of_peak"]
    dist["stages"] = {s: roofline.distance(flops[batch][s], stages[s]["median_ms"], row_peak)
                      for s in EAGER_STAGES if stages[s] is not None and flops[batch][s] > 0}
    dist["gflop"] = {s: f / 1e9 for s, f in flops[batch].items()}
    backend = run["backend"]
    return dict(spec.fields(), label=spec.label, batch=batch, provisional=not timed, error=run.get("error"), stages=stages,
                stages_timed=run["stages_timed"], stage_timing=backend.stage_timing,
                graph_precisions={g: str(p) for g, p in backend.graph_precisions.items()},
                cuda_numerics=run.get("cuda_numerics"), images_per_s=batch / e2e * 1000, startup_s=run["startup_s"],
                first_call_ms=run["first_call_ms"], first_call_memory_mb=run["first_memory"].call_mb,
                accuracy=run["accuracy"], distance=dist, peak_memory_mb=run["memory"].peak_mb or run["first_memory"].peak_mb,
                call_memory_mb=run["memory"].call_mb,
                auto=auto == (spec.name, precision) and (spec.memory_format, spec.numerics) == ("nchw", "t2f"))


def rows(live: list, flops: dict, peak: dict, auto) -> list[dict]:
    """The report's rows of the runs so far, each with its speed-ups (see `speedups`)."""
    out = [row(run, flops, peak, auto) for run in live]
    speedups(out)
    return out


def speedups(rows: list[dict]) -> None:
    """Each row's speed-up over eager fp32 with t2f's numerics at its batch ("speedup"), and over eager fp32 with
    PyTorch's defaults ("speedup_vs_defaults"); None where that baseline has no row at the batch."""
    def medians(run: Run) -> dict:
        return {r["batch"]: r["stages"]["end_to_end"]["median_ms"] for r in rows
                if (r["backend"], r["precision"], r["memory_format"], r["numerics"]) == tuple(run.fields().values())}

    eager, defaults = medians(BASELINE), medians(DEFAULTS)
    for r in rows:
        ms = r["stages"]["end_to_end"]["median_ms"]
        r["speedup"] = eager[r["batch"]] / ms if r["batch"] in eager else None
        r["speedup_vs_defaults"] = defaults[r["batch"]] / ms if r["batch"] in defaults else None


# ----------------------------------------------------------------------------
# Markdown.


def _cell(row: dict, stage: str) -> str:
    stats = row["stages"][stage]
    if stats is None:
        return "in synthesis" if stage == "uint8_conversion" and row.get("stages_timed", True) else "-"
    spread = stats.get("p99_ms", stats["max_ms"])
    mark = " eager" if row.get("stage_timing") == "eager" and stage in EAGER_STAGES else ""
    return f"{stats['median_ms']:.2f} ({spread:.2f}){mark}"


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    spread = "p99" if meta["iters"] >= P99_MIN_SAMPLES else "max"
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in meta.get("peak_gflops", {}).items() if v) or "not measured"
    lines = [f"{meta['date']}, {meta['device_name']}, load {meta.get('load', '?')}, torch {meta['torch']}, {meta.get('generator', 'generator')} "
             f"({meta['resolution']} px), CLIP {meta['clip']}; median ({spread}) ms over {meta['iters']} interleaved rounds "
             f"(\"provisional\": over the calls right after the first, before the rounds). Measured GEMM peak GFLOP/s: "
             f"{peaks}. auto picks {meta.get('auto', '?')} here. uint8_conversion: eager to_uint8 of the float image, "
             f"\"in synthesis\" where the graph outputs uint8; \"eager\": that stage timed outside the CUDA graph "
             f"(end_to_end replays it); \"-\": not timed (--no-stages). speed-up: over eager fp32 with t2f's numerics; "
             f"vs defaults: over {DEFAULTS_LABEL}. Memory: {meta.get('peak_memory', '?')}", "",
             "| backend | precision | layout | batch | " + " | ".join(STAGES) +
             " | images/s | speed-up | vs defaults | startup s | first call ms | GFLOP/s | of fp32 / row peak | emb. cosine "
             "| ws rel. err | uint8 mean / max | peak MB | call MB |",
             "|" + "---|" * (len(STAGES) + 17)]
    for r in report["results"]:
        cells = [_cell(r, s) for s in STAGES]
        a, d = r.get("accuracy") or {}, r.get("distance") or {}
        cos = "-" if a.get("embedding_cosine") is None else f"{a['embedding_cosine']:.5f}"
        acc = (f"{cos} | {a['ws_relative_error']:.1e} | {a['uint8_mean_diff']:.2f} / {a['uint8_max_diff']}" if a else "- | - | -")
        mark = (" **auto**" if r.get("auto") else "") + (" (provisional)" if r.get("provisional") else "") + \
               (" (stopped: see below)" if r.get("error") else "")
        lines.append(f"| {r.get('label', r['backend'])}{mark} | {r['precision']} | {r.get('memory_format', 'nchw')} | {r['batch']} | "
                     + " | ".join(cells) + f" | {r['images_per_s']:.1f} | {_times(r.get('speedup'))} | "
                     f"{_times(r.get('speedup_vs_defaults'))} | {r['startup_s']:.1f} | {r['first_call_ms']:.0f} | "
                     f"{d.get('gflops_per_s', 0):.0f} | {_share(d.get('share_of_fp32_peak'))} / {_share(d.get('share_of_peak'))} | "
                     f"{acc} | {_mb(r.get('peak_memory_mb'))} | {_mb(r.get('call_memory_mb'))} |")
    for s in report["skipped"]:
        where = f" batch {s['batch']}" if "batch" in s else ""
        layout = "" if s.get("memory_format", "nchw") == "nchw" else f", {s['memory_format']}"
        lines.append(f"\nskipped {s.get('label', s['backend'])} ({s['precision']}{layout}{where}): {s['reason']}")
    return "\n".join(lines) + "\n"
