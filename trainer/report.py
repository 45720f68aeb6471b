"""Training progress as pictures: face grids written during fit, and `report.html` made from a run.

During fit, every evaluation writes `grids/step-NNNNNNN.png`: for a fixed list of prompts and
a few held-out pairs, faces from the EMA mapper with fixed z (the held-out rows start with the
pair's own image G(w)). `grids/rows.json` names the rows and columns. `write_report` turns
`stats.jsonl`, the grids and `options.json` into one self-contained HTML page (plots and grids
embedded as base64 PNGs).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import torch

from t2f.files import atomic_path, write_json
from t2f.stylegan2 import to_uint8
from t2f.types import StyleGenerator

from .run import Run, RunError

# Fixed rows of every grid: what a user would type, then held-out pairs (their truth first).
PROMPTS = ("a smiling woman", "an old man with a grey beard", "a young girl with curly hair", "a man wearing glasses")
HELD_OUT_ROWS = 4
SAMPLES = 4                     # Faces per row, one fixed z each.
FACE_MAX = 128                  # Grid cell size: the generator's resolution, at most this.
DISPLAY_MIN = 128               # The report enlarges smaller faces by an integer factor to at least this.
GRID_NAME = re.compile(r"step-(\d+)\.png")
# Below this share of w's variance explained by the embedding, a run is said not to use its text.
WARN_EXPLAINED = 0.25


def condition_warning(entry: dict) -> str | None:
    """The warning for a held-out evaluation whose embedding path does not clearly beat the mean-w baseline, else None."""
    explained = entry.get("w_explained")
    if not isinstance(explained, (int, float)) or explained >= WARN_EXPLAINED:
        return None
    return (f"warning: at step {entry['step']} the embedding explains only {explained:.0%} of w's variance on held-out pairs "
            f"(w_error is {1 - explained:.2f} of the mean-w baseline; below {WARN_EXPLAINED:.0%} counts as not using the text): "
            f"faces will barely follow the prompt. Train longer (--steps), with more pairs (--samples), or see "
            f"'Reading a training run' in the README")


# ----------------------------------------------------------------------------
# Grids, written by fit.


def grid_dir(run: Run) -> Path:
    return run.out / "grids"


def grid_path(run: Run, step: int) -> Path:
    return grid_dir(run) / f"step-{step:07d}.png"


def grid_steps(run: Run) -> list[int]:
    """Steps that have a grid on disk, in order."""
    if not grid_dir(run).is_dir():
        return []
    return sorted(int(m.group(1)) for p in grid_dir(run).iterdir() if (m := GRID_NAME.fullmatch(p.name)))


def remove_grids_after(run: Run, step: int) -> None:
    """Grids of steps after a checkpoint belong to the steps a resumed run takes again."""
    for s in grid_steps(run):
        if s > step:
            grid_path(run, s).unlink(missing_ok=True)


def grid_layout(has_prompts: bool, held_out: int) -> dict:
    rows = ([dict(label=p, kind="prompt") for p in PROMPTS] if has_prompts else []) + \
           [dict(label=f"held-out pair {i + 1}", kind="held-out") for i in range(held_out)]
    return dict(rows=rows, columns=["true G(w)"] + [f"z {j + 1}" for j in range(SAMPLES)])


def grid_latents(z_dim: int, seed: int) -> torch.Tensor:
    """The fixed z of the grid's columns [SAMPLES, z_dim], the same at every evaluation."""
    return torch.randn([SAMPLES, z_dim], generator=torch.Generator().manual_seed(int(seed) + 7919))


@torch.no_grad()
def face_grid(mapper, generator: StyleGenerator, conditions: torch.Tensor, truths: torch.Tensor | None, z: torch.Tensor) -> np.ndarray:
    """Faces [rows * face, (1 + SAMPLES) * face, 3] uint8: per condition a blank or true face, then one face per z.

    conditions [rows, D]; truths [rows, num_ws, w_dim] for the last rows (the held-out pairs) or None.
    """
    rows, k = conditions.shape[0], z.shape[0]
    device = conditions.device
    ws = mapper(conditions.repeat_interleave(k, dim=0), z.to(device).repeat(rows, 1))   # [rows * k, num_ws, w_dim]
    faces = _faces(generator, ws).reshape(rows, k, *_faces_shape(generator))
    first = torch.full((rows, 1, *_faces_shape(generator)), 255, dtype=torch.uint8)
    if truths is not None and truths.shape[0]:
        first[rows - truths.shape[0]:, 0] = _faces(generator, truths.to(device))
    cells = torch.cat([first, faces], dim=1)                                           # [rows, 1 + k, S, S, 3]
    s = cells.shape[2]
    return cells.permute(0, 2, 1, 3, 4).reshape(rows * s, (1 + k) * s, 3).numpy()


def _faces_shape(generator: StyleGenerator) -> tuple[int, int, int]:
    s = min(generator.resolution, FACE_MAX)
    return s, s, 3


def _faces(generator: StyleGenerator, ws: torch.Tensor) -> torch.Tensor:
    out = []
    for chunk in ws.split(8):
        img = generator.synthesis(chunk, noise_mode="const").float()
        s = _faces_shape(generator)[0]
        if img.shape[-1] != s:
            img = torch.nn.functional.interpolate(img, size=(s, s), mode="area")
        out.append(to_uint8(img).cpu())
    return torch.cat(out)


def write_grid(run: Run, step: int, grid: np.ndarray) -> None:
    import PIL.Image

    with atomic_path(grid_path(run, step)) as tmp:
        PIL.Image.fromarray(grid).save(tmp, format="PNG")


def write_grid_layout(run: Run, layout: dict) -> None:
    write_json(grid_dir(run) / "rows.json", layout)


# ----------------------------------------------------------------------------
# The report.


def read_stats(run: Run) -> list[dict]:
    """stats.jsonl's entries; a torn last line (a killed run) is skipped."""
    entries = []
    if run.stats_path.is_file():
        for line in run.stats_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int):
                entries.append(entry)
    return entries


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _series(entries: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in entries if isinstance(e.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


NO_MATPLOTLIB = ("matplotlib is not installed, so the report has no curves (pip install matplotlib, "
                 "then `t2f-train report --out RUN` redraws it)")


def can_plot() -> bool:
    """Whether the report can draw its curves: matplotlib is optional (the GPU image, for one, lacks it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plots(entries: list[dict]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of the loss curves and the held-out metrics; none without matplotlib."""
    if not can_plot():
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    plots = []
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for key, label in LOSSES:
        steps, values = _series(entries, key)
        if steps and all(v > 0 for v in values):
            ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("Training losses (training batches)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plots.append(("losses", _png(fig)))

    evals = [e for e in entries if "w_error" in e]
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for key, label in (("w_error", "embedding only (prior path)"), ("w_error_posterior", "through the encoder (posterior path)")):
        steps = [e["step"] for e in evals if key in e]
        ratio = [e[key] / e["w_error_mean_baseline"] for e in evals if key in e]
        left.plot(steps, ratio, marker="o", label=label)
    left.axhline(1.0, color="k", linestyle="--", linewidth=1, label="mean-w baseline")
    left.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="half the baseline")
    left.set_ylim(bottom=0)
    left.set_xlabel("step")
    left.set_title("Held-out w error / mean-w baseline (lower is better)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for key, label in (("w_explained", "variance of w explained by the embedding"), ("z_spread", "spread z gives / data spread"),
                       ("clip_consistency", "cos(CLIP(G(w_hat)), e)"), ("clip_consistency_ceiling", "its ceiling cos(CLIP(G(w)), e)")):
        steps, values = _series(evals, key)
        if steps:
            right.plot(steps, values, marker="o", label=label, linestyle="--" if key.endswith("ceiling") else "-")
    right.set_xlabel("step")
    right.set_title("Held-out: what the text and z each do")
    if right.get_legend_handles_labels()[0]:              # a run without any of these metrics yet has no lines
        right.legend(fontsize=8)
    right.grid(alpha=0.3)
    plots.append(("held-out metrics", _png(fig)))
    return plots


LOSSES = (("loss", "total"), ("reconstruction", "w reconstruction (posterior)"), ("prior", "w from the embedding (prior path)"),
          ("regression", "mean head's regression"),
          ("kl", "KL per z dimension"), ("clip_loss", "CLIP 1 - cos"))

METRICS = (
    ("w_explained", "{:.3f}", "share of w's variance the embedding explains: 1 - w_error / w_error_mean_baseline "
                              "(1 = the text fixes w, 0 = no better than the mean w)"),
    ("z_spread", "{:.3f}", "variance of w over z for one embedding, over the data's variance of w "
                           "(0 = z does nothing; about 1 - w_explained when z models exactly what the text leaves open)"),
    ("w_error", "{:.4g}", "mean squared error of the embedding-only prediction (mean over z samples)"),
    ("w_error_mean_baseline", "{:.4g}", "mean squared error of predicting the training mean w"),
    ("w_error_posterior", "{:.4g}", "mean squared error through the encoder (sees the true w)"),
    ("clip_consistency", "{:.3f}", "cos(CLIP(G(w_hat)), e)"),
    ("clip_consistency_ceiling", "{:.3f}", "cos(CLIP(G(w)), e): what the true w reaches"),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 10px; text-align: left; vertical-align: top; }
tr:nth-child(even) { background: #f5f5f5; }
.warning { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; font-weight: 600; }
.ok { background: #e7f5e7; border: 1px solid #6a6; padding: 0.6em 1em; }
.grid { display: flex; align-items: flex-start; margin: 0.4em 0 1.2em; }
.labels div { white-space: nowrap; padding-right: 8px; text-align: right; font-size: 0.85em; overflow: hidden; }
.cols { display: flex; font-size: 0.75em; color: #555; }
.cols div { text-align: center; overflow: hidden; }
img.faces { image-rendering: pixelated; }
"""


def write_report(run: Run) -> Path:
    """Write RUN/report.html from the run's stats, grids and options; RunError if there is nothing to show."""
    if not run.out.is_dir():
        raise RunError(f"{run.out} {'is not a directory' if run.out.exists() else 'does not exist'}; pass the --out of a t2f-train run")
    options = run.options()                        # {} without options.json (fit called as a library); refuses a foreign one
    entries = read_stats(run)
    if not entries:
        raise RunError(f"{run.out} has no training statistics yet (stats.jsonl is missing or empty); run `t2f-train fit` first")
    fit = (options.get("fit") or {}).get("identity", {})
    synth = options.get("synth") or {}
    evals = [e for e in entries if "w_error" in e]
    last = evals[-1] if evals else None
    steps_total = fit.get("steps")
    esc = html.escape

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>t2f-train report: {esc(run.out.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>t2f-train report: {esc(str(run.out))}</h1>",
             f"<p>Generator <b>{esc(str(synth.get('generator', '?')))}</b>, CLIP <b>{esc(str(synth.get('identity', {}).get('clip', '?')))}</b>, "
             f"{esc(str(synth.get('identity', {}).get('samples', '?')))} pairs. Fit reached step <b>{entries[-1]['step']}</b>"
             f"{f' of {steps_total}' if steps_total else ''}"
             f"{' (finished)' if (run.out / 'model.safetensors').is_file() and entries[-1]['step'] == steps_total else ''}.</p>"]
    if last is None:
        parts.append("<p class='warning'>No held-out evaluation yet (one comes every --eval-every steps).</p>")
    else:
        message = condition_warning(last)
        parts.append(f"<p class='warning'>{esc(message)}</p>" if message else
                     f"<p class='ok'>At step {last['step']} the embedding explains {last['w_explained']:.0%} of w's variance on "
                     f"held-out pairs, and z spreads the faces of one embedding by {last['z_spread']:.0%} of the data's spread.</p>")
        parts.append(f"<h2>Held-out metrics at step {last['step']}</h2><table>")
        for key, fmt, meaning in METRICS:
            if isinstance(last.get(key), (int, float)):
                parts.append(f"<tr><th>{key}</th><td>{fmt.format(last[key])}</td><td>{esc(meaning)}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Curves</h2><p>Left of the held-out plot: below the dashed line the text predicts w better than the "
                 "mean w; the dotted line is the quality bar (half the baseline). The posterior path sees the true w; far "
                 "below the embedding-only curve while that one stays high, it means the decoder reads w from z instead of "
                 "the text.</p>")
    if not can_plot():
        parts.append(f"<p class='warning'>{esc(NO_MATPLOTLIB)}.</p>")
    for title, png in _plots(entries):
        parts.append(f"<p><img alt='{esc(title)}' src='data:image/png;base64,{png}'></p>")
    parts.append(_grids_html(run))
    parts.append("<h2>Fit options</h2><table>" + "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in sorted(fit.items())) + "</table></body></html>")
    path = run.out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path


def _grids_html(run: Run) -> str:
    steps = grid_steps(run)
    if not steps:
        return "<h2>Faces</h2><p>No grids yet (one is written at every evaluation).</p>"
    try:
        layout = json.loads((grid_dir(run) / "rows.json").read_text())
        rows, columns = [r["label"] for r in layout["rows"]], layout["columns"]
    except (OSError, ValueError, KeyError, TypeError):
        rows, columns = None, None
    out = ["<h2>Faces from the EMA mapper at each evaluation</h2>",
           "<p>Each row is one condition, each column one fixed z, the same at every step. Prompt rows use CLIP's text "
           "embedding; held-out rows use a held-out pair's image embedding and start with that pair's own image G(w): "
           "its samples should come to resemble it. A mapper that ignores the text gives the same faces in every row.</p>"]
    for step in reversed(steps):
        data = grid_path(run, step).read_bytes()
        height = _png_height(data)
        face = height // len(rows) if rows and height else 0
        cell = face * max(1, DISPLAY_MIN // face) if face else 0                 # small faces shown enlarged
        out.append(f"<h3>step {step}</h3><div class='grid'>")
        if cell:
            out.append("<div class='labels'><div style='height:1.3em'></div>" + "".join(
                f"<div style='height:{cell}px;line-height:{cell}px'>{html.escape(label)}</div>" for label in rows) + "</div>")
        out.append("<div>")
        if cell:
            out.append("<div class='cols'>" + "".join(f"<div style='width:{cell}px;height:1.3em'>{html.escape(c)}</div>" for c in columns) + "</div>")
        size = f" width='{cell * len(columns)}'" if cell else ""
        out.append(f"<img class='faces'{size} alt='faces at step {step}' src='data:image/png;base64,{base64.b64encode(data).decode('ascii')}'>"
                   "</div></div>")
    return "\n".join(out)


def _png_height(data: bytes) -> int:
    """Height from a PNG's IHDR chunk (0 if the bytes are not a PNG)."""
    return int.from_bytes(data[20:24], "big") if data[:8] == b"\x89PNG\r\n\x1a\n" else 0
