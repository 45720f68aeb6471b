"""Fit ablation: the default fit options against one changed knob at a time, on one set of pairs.

Each variant copies the pairs of a synth run (made once with `t2f-train synth`) into its own run
directory and runs `t2f-train fit` there; a finished variant is skipped, a stopped one resumes.
The table holds each variant's last held-out evaluation.

    t2f-train synth --generator tiny --clip tiny --out runs/pairs-tiny
    python benchmarks/fit_ablation.py --pairs runs/pairs-tiny --out runs/ablation-tiny --steps 1500
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

# name -> the fit options it changes. "defaults" first; each other row undoes one of the changes that made the
# mapper use the text (see trainer/fit.py) or tries one more knob. (The EMA warm-up and the antithetic evaluation have no option:
# they are in every row.)
OLD = ["--no-mean-head", "--prior-weight", "0", "--clip-posterior", "--embed-noise-absolute", "--embed-noise", "0.75:1",
       "--embed-noise-share", "1", "--no-standardize", "--lr", "2e-4"]
VARIANTS = {
    "defaults": [],
    "no mean head": ["--no-mean-head"],
    "no prior-path loss": ["--prior-weight", "0"],
    "noise on every sample": ["--embed-noise-share", "1"],
    "embedding noise off": ["--embed-noise", "0:0"],
    "clip2latent's noise (absolute 0.75:1, every sample)": ["--embed-noise-absolute", "--embed-noise", "0.75:1", "--embed-noise-share", "1"],
    "no embedding standardization": ["--no-standardize"],
    "learning rate 2e-3 (the previous default)": ["--lr", "2e-3"],
    "FT2S learning rate 2e-4": ["--lr", "2e-4"],
    "no CLIP loss": ["--clip-every", "0"],
    "CLIP loss on the posterior's sample": ["--clip-posterior"],
    "z-dim 8": ["--z-dim", "8"],
    "KL 1": ["--kl", "1"],
    "old defaults (all of the above reverted)": OLD,
}


def evals(run: Path) -> list[dict]:
    stats = run / "stats.jsonl"
    if not stats.is_file():
        return []
    return [e for e in map(json.loads, stats.read_text().splitlines()) if "w_error" in e]


def finished(run: Path, steps: int) -> bool:
    history = evals(run)
    return bool(history) and history[-1]["step"] == steps and (run / "model.safetensors").exists()


@click.command()
@click.option("--pairs",   help="A run directory whose synth stage is complete", metavar="DIR", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--out",     help="Directory for one run per variant", metavar="DIR", type=click.Path(file_okay=False), required=True)
@click.option("--steps",   help="Fit steps of every variant", metavar="INT", type=click.IntRange(min=1), default=1500, show_default=True)
@click.option("--only",    help="Run only these variants (by name; repeat)", metavar="NAME", multiple=True)
@click.option("--device",  help="Device for fit", metavar="STR", default="cpu", show_default=True)
@click.option("--table",   help="Run nothing: print the table of the variants finished so far", is_flag=True)
def main(pairs, out, steps, only, device, table):
    """Run the variants one after another and print a markdown table of their last held-out evaluation.

    Several processes may share one --out with disjoint --only lists (each variant has its own run directory).
    """
    unknown = [n for n in only if n not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}", param_hint="--only")
    out = Path(out)
    rows = []
    for i, (name, args) in enumerate(VARIANTS.items()):
        if only and name not in only:
            continue
        run = out / f"{i:02d}"
        if table:
            rows.append((name, args, evals(run) if finished(run, steps) else []))
            continue
        if not run.exists():
            shutil.copytree(Path(pairs) / "pairs", run / "pairs")
            shutil.copy(Path(pairs) / "options.json", run / "options.json")
        cmd = [sys.executable, "-m", "t2f.trainer.cli", "fit", "--out", str(run), "--steps", str(steps), "--device", device, "--no-progress", *args]
        if not finished(run, steps):
            start = time.perf_counter()
            print(f"[{name}] {shlex.join(cmd)}", flush=True)
            with open(run / "fit.log", "a") as log:
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
            print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
        rows.append((name, args, evals(run)))

    print("\n| variant | fit options changed | w_error / baseline | z_spread | w_error_posterior / baseline | clip_consistency (ceiling) | w_error / baseline over the run |")
    print("|---|---|---|---|---|---|---|")
    for name, args, history in rows:
        if not history:
            print(f"| {name} | `{shlex.join(args) or '(none)'}` | not run | | | | |")
            continue
        e, b = history[-1], history[-1]["w_error_mean_baseline"]
        curve = " / ".join(f"{h['w_error'] / h['w_error_mean_baseline']:.3f}" for h in history)
        print(f"| {name} | `{shlex.join(args) or '(none)'}` | {e['w_error'] / b:.3f}{' (warning)' if 'warning' in e else ''} | "
              f"{e['z_spread']:.3f} | {e['w_error_posterior'] / b:.3f} | {e.get('clip_consistency', float('nan')):.3f} "
              f"({e.get('clip_consistency_ceiling', float('nan')):.3f}) | {curve} |")


if __name__ == "__main__":
    sys.exit(main())
