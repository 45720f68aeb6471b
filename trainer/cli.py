"""`t2f-train`: text-free, data-free training of the mapper, in three resumable stages.

The command maps its options to a `TrainConfig` and calls `t2f.trainer.train` (trainer/stages.py);
`--dry-run` prints that config. It also picks the budget of the generator preset (samples, steps,
eval_every) for the options left out.
"""

from __future__ import annotations

import dataclasses
import json
import math

import click

from t2f.cli import FiniteFloatRange, nonempty_path, user_errors
from t2f.presets import DEFAULT_CLIP, DEFAULT_GENERATOR

from .config import BUDGET, PRESET_BUDGETS, RANGES, STAGES, BankOptions, FitOptions, SynthOptions, TrainConfig, budget
from .config import fit_identity as _fit_identity  # noqa: F401  (tests build recorded fit options with it)

FIT_DEFAULTS = FitOptions()


def _budget_help(key: str) -> str:
    return f"[default: {BUDGET[key]}; " + "; ".join(f"{name}: {b[key]}" for name, b in PRESET_BUDGETS.items()) + "]"


def _apply_budget(kw: dict, generator: str | None) -> dict:
    """Fill the budget options left at their default from the generator's budget."""
    values = budget(generator)
    return {**kw, **{k: values[k] for k in values if k in kw and kw[k] is None}}


def _range(text: str) -> tuple[float, float]:
    try:
        lo, _, hi = text.partition(":")
        lo, hi = float(lo), float(hi or lo)
    except ValueError:
        raise click.BadParameter(f"expected MIN:MAX, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise click.BadParameter(f"expected 0 <= MIN <= MAX, got {text!r}")
    return lo, hi


# ----------------------------------------------------------------------------
# Options, declared once and shared by the one-command form and the subcommands.

def _options(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def _ints(section: str, field: str) -> click.IntRange:
    """The option's range: RANGES (trainer/config.py), what the config's dataclass accepts, so a refusal is exit 2 before any work."""
    return click.IntRange(*RANGES[section][field])

COMMON = _options(
    click.option("--out",          help="Run directory", metavar="DIR", type=click.Path(file_okay=False), callback=nonempty_path),
    click.option("--device",       help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)", metavar="STR", default="auto", show_default=True),
    click.option("--seed",         help="Seed: synth's z, fit's initialization, split and steps", metavar="INT", type=_ints("fit", "seed"), default=0, show_default=True),
    click.option("--dry-run",      help="Print the resolved config (what t2f.trainer.train gets) and exit", is_flag=True),
    click.option("--progress/--no-progress", help="Progress bars", default=True, show_default=True),
)
SYNTH = _options(
    click.option("--generator",    help="Generator preset, directory, NVIDIA .pkl or rosinality .pt", metavar="NAME|PATH", default=DEFAULT_GENERATOR, show_default=True),
    click.option("--clip",         help="open_clip MODEL:TAG, MODEL:/path, or tiny", metavar="SPEC", default=DEFAULT_CLIP, show_default=True),
    click.option("--samples",      help=f"Pairs to synthesize {_budget_help('samples')}", metavar="INT", type=_ints("synth", "samples")),
    click.option("--shard-size",   help="Pairs per shard", metavar="INT", type=_ints("synth", "shard_size"), default=5000, show_default=True),
    click.option("--synth-batch",  help="Images per synth batch", metavar="INT", type=_ints("synth", "batch"), default=16, show_default=True),
    click.option("--downsample",   help="Area-resize images to this size before CLIP; 0 = CLIP's resize only", metavar="INT", type=_ints("synth", "downsample"), default=256, show_default=True),
    click.option("--max-shards",   help="Stop after this many new shards, per process (resume later)", metavar="INT", type=_ints("synth", "max_shards")),
)
FIT = _options(
    click.option("--steps",        help=f"Optimizer steps {_budget_help('steps')}", metavar="INT", type=_ints("fit", "steps")),
    click.option("--batch",        help="Global batch size", metavar="INT", type=_ints("fit", "batch"), default=FIT_DEFAULTS.batch, show_default=True),
    click.option("--lr",           help="Peak learning rate", metavar="FLOAT", type=FiniteFloatRange(min=0, min_open=True, max=1), default=FIT_DEFAULTS.lr, show_default=True),
    click.option("--warmup",       help="Learning-rate warm-up steps", metavar="INT", type=_ints("fit", "warmup"), default=FIT_DEFAULTS.warmup, show_default=True),
    click.option("--kl",           help="KL weight", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.kl, show_default=True),
    click.option("--kl-warmup",    help="KL weight warm-up steps", metavar="INT", type=_ints("fit", "kl_warmup"), default=FIT_DEFAULTS.kl_warmup, show_default=True),
    click.option("--prior-weight", help="Prior-path loss weight (energy score of decoded z ~ N(0, I) against w); 0 = plain CVAE", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.prior_weight, show_default=True),
    click.option("--embed-noise",  help="Embedding noise scale MIN:MAX, in units of the pairs' embedding spread (0:0 = off)", metavar="MIN:MAX", default=f"{FIT_DEFAULTS.noise_min}:{FIT_DEFAULTS.noise_max}", show_default=True),
    click.option("--embed-noise-share", "noise_share", help="Share of the samples that get embedding noise (the rest stay clean)", metavar="FLOAT", type=FiniteFloatRange(0, 1), default=FIT_DEFAULTS.noise_share, show_default=True),
    click.option("--embed-noise-relative/--embed-noise-absolute", "noise_relative", help="Noise scale relative to the embedding spread, or absolute (clip2latent's)", default=FIT_DEFAULTS.noise_relative, show_default=True),
    click.option("--standardize/--no-standardize", help="Standardize embeddings with the training pairs' mean and spread", default=FIT_DEFAULTS.standardize, show_default=True),
    click.option("--clip-weight",  help="CLIP-consistency loss weight", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.clip_weight, show_default=True),
    click.option("--clip-every",   help="CLIP-consistency loss every k steps; 0 = off", metavar="INT", type=_ints("fit", "clip_every"), default=FIT_DEFAULTS.clip_every, show_default=True),
    click.option("--clip-prior/--clip-posterior", help="CLIP-consistency loss on a prior sample (as at inference) or on the posterior's", default=FIT_DEFAULTS.clip_prior, show_default=True),
    click.option("--clip-batch",   help="Samples through G and CLIP for that loss, per process", metavar="INT", type=_ints("fit", "clip_batch"), default=FIT_DEFAULTS.clip_batch, show_default=True),
    click.option("--ema",          help="EMA decay", metavar="FLOAT", type=FiniteFloatRange(0, 1, max_open=True), default=FIT_DEFAULTS.ema, show_default=True),
    click.option("--val-fraction", help="Held-out share of the pairs", metavar="FLOAT", type=FiniteFloatRange(0, 0.5, min_open=True), default=FIT_DEFAULTS.val_fraction, show_default=True),
    click.option("--checkpoint-every", help="Steps between checkpoints", metavar="INT", type=_ints("fit", "checkpoint_every"), default=FIT_DEFAULTS.checkpoint_every, show_default=True),
    click.option("--log-every",    help="Steps between stats lines", metavar="INT", type=_ints("fit", "log_every"), default=FIT_DEFAULTS.log_every, show_default=True),
    click.option("--eval-every",   help=f"Steps between held-out metrics and face grids {_budget_help('eval_every')}", metavar="INT", type=_ints("fit", "eval_every")),
    click.option("--z-dim",        help="Mapper latent size", metavar="INT", type=_ints("fit", "z_dim"), default=FIT_DEFAULTS.z_dim, show_default=True),
    click.option("--hidden",       help="Mapper hidden width", metavar="INT", type=_ints("fit", "hidden"), default=FIT_DEFAULTS.hidden, show_default=True),
    click.option("--layers",       help="Mapper linear layers", metavar="INT", type=_ints("fit", "layers"), default=FIT_DEFAULTS.layers, show_default=True),
    click.option("--w-plus",       help="Predict one w per style", is_flag=True),
    click.option("--mean-head/--no-mean-head", help="A z-free head predicts E[w | e] (regression), the CVAE adds z's residual", default=FIT_DEFAULTS.mean_head, show_default=True),
    click.option("--mean-weight",  help="Mean head's regression loss weight", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.mean_weight, show_default=True),
    click.option("--stop-after",   help="Stop (with a checkpoint) after this many steps in this run; resume later", metavar="INT", type=_ints("run", "stop_after")),
)
BANK = _options(
    click.option("--bank-size",    help="Embeddings in the KNN bank; 0 = all pairs", metavar="INT", type=_ints("bank", "size"), default=0, show_default=True),
)


# ----------------------------------------------------------------------------
# Options -> TrainConfig -> train().


def _fit_options(kw: dict) -> FitOptions:
    noise_min, noise_max = _range(kw["embed_noise"])
    names = {f.name for f in dataclasses.fields(FitOptions)}
    values = {k: v for k, v in kw.items() if k in names}
    return FitOptions(noise_min=noise_min, noise_max=noise_max, **values)


# Synth options and the SynthOptions fields they set.
SYNTH_FIELDS = dict(samples="samples", shard_size="shard_size", synth_batch="batch", downsample="downsample", seed="seed",
                    max_shards="max_shards")


def _config(kw: dict) -> TrainConfig:
    """The TrainConfig of one command's options (the sections it has no options for keep their defaults)."""
    return TrainConfig(
        generator=kw.get("generator"), clip=kw.get("clip"), device=kw["device"], progress=kw["progress"],
        stop_after=kw.get("stop_after"),
        synth=SynthOptions(**{field: kw[name] for name, field in SYNTH_FIELDS.items() if name in kw}),
        fit=_fit_options(kw) if "embed_noise" in kw else FitOptions(),
        bank=BankOptions(size=kw["bank_size"]) if "bank_size" in kw else BankOptions(),
    )


def _recorded_generator(out: str) -> str | None:
    """The generator name the run's synth stage recorded (None if there is none yet, or the run is unreadable)."""
    from .run import Run, RunError

    try:
        return (Run(out).options().get("synth") or {}).get("generator")
    except (RunError, OSError):
        return None


def _train(kw: dict, stages: tuple[str, ...]) -> None:
    """Build the config (user errors in the options: exit 2), print it for --dry-run, or train (run errors: exit 1)."""
    if not kw["out"]:
        raise click.UsageError("--out DIR is required")
    config = _config(kw)
    if kw["dry_run"]:
        click.echo(json.dumps(dict(stages=list(stages), out=kw["out"], config=config.to_dict(stages)), indent=2, sort_keys=True))
        return
    from .stages import train

    with user_errors(output="the run directory"):
        train(kw["out"], config, stages)


# ----------------------------------------------------------------------------
# Commands.


@click.group(invoke_without_command=True, context_settings=dict(help_option_names=["-h", "--help"]))
@COMMON
@SYNTH
@FIT
@BANK
@click.pass_context
def main(cctx, **kw):
    """Train a mapper for any StyleGAN2 and any CLIP, without captions or an image dataset.

    Without a subcommand, runs synth, fit and bank in order; each resumes where it stopped.

    \b
    Examples:
    t2f-train --generator tiny --clip tiny --out runs/tiny          # a first run: random-weight models, a few minutes on a CPU
    t2f-train --generator ffhq-1024 --clip ViT-B-32:openai --out runs/ffhq
    t2f-train report --out runs/ffhq                                 # report.html: curves and faces over training
    t2f-train synth --generator ffhq-1024 --clip ViT-B-32:openai --out runs/ffhq --samples 200000
    t2f-train fit --out runs/ffhq --steps 50000
    torchrun --nproc_per_node 8 -m t2f.trainer.cli --out runs/ffhq      # multi-GPU
    """
    if cctx.invoked_subcommand is not None:
        given = [p.opts[0] for p in cctx.command.params
                 if cctx.get_parameter_source(p.name) not in (click.core.ParameterSource.DEFAULT, None)]
        if given:
            raise click.UsageError(f"{', '.join(given)} must come after the subcommand ({cctx.invoked_subcommand})")
        return
    _train(_apply_budget(kw, kw["generator"]), STAGES)


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@COMMON
@SYNTH
def synth(**kw):
    """Stage 1: sample z -> w -> image -> CLIP image embedding, in resumable shards."""
    _train(_apply_budget(kw, kw["generator"]), ("synth",))


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@COMMON
@FIT
@click.option("--generator", help="The run's generator, if it moved [default: as recorded by synth]", metavar="PATH")
@click.option("--clip",      help="The run's CLIP, if its checkpoint moved [default: as recorded by synth]", metavar="SPEC")
def fit(**kw):
    """Stage 2: train the conditional VAE on the pairs (resumes from the checkpoint)."""
    _train(_apply_budget(kw, _recorded_generator(kw["out"]) if kw["out"] else None), ("fit",))


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@COMMON
@BANK
def bank(**kw):
    """Stage 3: the embedding bank for `t2f-infer --mode knn`."""
    _train(kw, ("bank",))


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--out", help="Run directory", metavar="DIR", type=click.Path(), required=True, callback=nonempty_path)
def report(out):
    """Write RUN/report.html: loss and held-out metric curves, and the face grids of every evaluation.

    fit writes it too, when it stops or finishes. The page is self-contained (images embedded).
    """
    from .report import write_report
    from .run import Run

    with user_errors(output="the run directory"):
        click.echo(f"report: {write_report(Run(out))}")


if __name__ == "__main__":
    main()
