"""`t2f-train`: text-free, data-free training of the mapper, in three resumable stages."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import click

from t2f.cli_errors import FiniteFloatRange, nonempty_path

from .fit import FitOptions

FIT_DEFAULTS = FitOptions()
# Options that do not change the trained weights: they may differ when a run is resumed.
FIT_FREE = ("checkpoint_every", "log_every", "eval_every")

# The budget a real generator needs, and the budgets of the random-weight presets (a first run
# on the tiny models takes a few minutes on an idle 2-core CPU). Explicit options override them.
BUDGET = dict(samples=100_000, steps=FIT_DEFAULTS.steps, eval_every=FIT_DEFAULTS.eval_every)
PRESET_BUDGETS = {
    "tiny": dict(samples=10_000, steps=1500, eval_every=250),
}


def _budget_help(key: str) -> str:
    return f"[default: {BUDGET[key]}; " + "; ".join(f"{name}: {b[key]}" for name, b in PRESET_BUDGETS.items()) + "]"


def _apply_budget(kw: dict, generator: str | None) -> dict:
    """Fill the budget options left at their default from the generator's budget."""
    budget = PRESET_BUDGETS.get(generator, BUDGET)
    return {**kw, **{k: budget[k] for k in budget if k in kw and kw[k] is None}}


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


Pos = click.IntRange(min=1)
NonNeg = click.IntRange(min=0)

COMMON = _options(
    click.option("--out",          help="Run directory", metavar="DIR", type=click.Path(file_okay=False), callback=nonempty_path),
    click.option("--device",       help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)", metavar="STR", default="auto", show_default=True),
    click.option("--seed",         help="Seed: synth's z, fit's initialization, split and steps", metavar="INT", type=NonNeg, default=0, show_default=True),
    click.option("--dry-run",      help="Print the resolved options and exit", is_flag=True),
    click.option("--progress/--no-progress", help="Progress bars", default=True, show_default=True),
)
SYNTH = _options(
    click.option("--generator",    help="Generator preset, directory, NVIDIA .pkl or rosinality .pt", metavar="NAME|PATH", default="ffhq-1024", show_default=True),
    click.option("--clip",         help="open_clip MODEL:TAG, MODEL:/path, or tiny", metavar="SPEC", default="ViT-B-32:openai", show_default=True),
    click.option("--samples",      help=f"Pairs to synthesize {_budget_help('samples')}", metavar="INT", type=Pos),
    click.option("--shard-size",   help="Pairs per shard", metavar="INT", type=Pos, default=5000, show_default=True),
    click.option("--synth-batch",  help="Images per synth batch", metavar="INT", type=Pos, default=16, show_default=True),
    click.option("--downsample",   help="Area-resize images to this size before CLIP; 0 = CLIP's resize only", metavar="INT", type=NonNeg, default=256, show_default=True),
    click.option("--max-shards",   help="Stop after this many new shards, per process (resume later)", metavar="INT", type=Pos),
)
FIT = _options(
    click.option("--steps",        help=f"Optimizer steps {_budget_help('steps')}", metavar="INT", type=Pos),
    click.option("--batch",        help="Global batch size", metavar="INT", type=Pos, default=FIT_DEFAULTS.batch, show_default=True),
    click.option("--lr",           help="Peak learning rate", metavar="FLOAT", type=FiniteFloatRange(min=0, min_open=True, max=1), default=FIT_DEFAULTS.lr, show_default=True),
    click.option("--warmup",       help="Learning-rate warm-up steps", metavar="INT", type=NonNeg, default=FIT_DEFAULTS.warmup, show_default=True),
    click.option("--kl",           help="KL weight", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.kl, show_default=True),
    click.option("--kl-warmup",    help="KL weight warm-up steps", metavar="INT", type=NonNeg, default=FIT_DEFAULTS.kl_warmup, show_default=True),
    click.option("--prior-weight", help="Prior-path loss weight (energy score of decoded z ~ N(0, I) against w); 0 = plain CVAE", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.prior_weight, show_default=True),
    click.option("--embed-noise",  help="Embedding noise scale MIN:MAX, in units of the pairs' embedding spread (0:0 = off)", metavar="MIN:MAX", default=f"{FIT_DEFAULTS.noise_min}:{FIT_DEFAULTS.noise_max}", show_default=True),
    click.option("--embed-noise-share", "noise_share", help="Share of the samples that get embedding noise (the rest stay clean)", metavar="FLOAT", type=FiniteFloatRange(0, 1), default=FIT_DEFAULTS.noise_share, show_default=True),
    click.option("--embed-noise-relative/--embed-noise-absolute", "noise_relative", help="Noise scale relative to the embedding spread, or absolute (clip2latent's)", default=FIT_DEFAULTS.noise_relative, show_default=True),
    click.option("--standardize/--no-standardize", help="Standardize embeddings with the training pairs' mean and spread", default=FIT_DEFAULTS.standardize, show_default=True),
    click.option("--clip-weight",  help="CLIP-consistency loss weight", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.clip_weight, show_default=True),
    click.option("--clip-every",   help="CLIP-consistency loss every k steps; 0 = off", metavar="INT", type=NonNeg, default=FIT_DEFAULTS.clip_every, show_default=True),
    click.option("--clip-prior/--clip-posterior", help="CLIP-consistency loss on a prior sample (as at inference) or on the posterior's", default=FIT_DEFAULTS.clip_prior, show_default=True),
    click.option("--clip-batch",   help="Samples through G and CLIP for that loss, per process", metavar="INT", type=Pos, default=FIT_DEFAULTS.clip_batch, show_default=True),
    click.option("--ema",          help="EMA decay", metavar="FLOAT", type=FiniteFloatRange(0, 1, max_open=True), default=FIT_DEFAULTS.ema, show_default=True),
    click.option("--val-fraction", help="Held-out share of the pairs", metavar="FLOAT", type=FiniteFloatRange(0, 0.5, min_open=True), default=FIT_DEFAULTS.val_fraction, show_default=True),
    click.option("--checkpoint-every", help="Steps between checkpoints", metavar="INT", type=Pos, default=FIT_DEFAULTS.checkpoint_every, show_default=True),
    click.option("--log-every",    help="Steps between stats lines", metavar="INT", type=Pos, default=FIT_DEFAULTS.log_every, show_default=True),
    click.option("--eval-every",   help=f"Steps between held-out metrics and face grids {_budget_help('eval_every')}", metavar="INT", type=Pos),
    click.option("--z-dim",        help="Mapper latent size", metavar="INT", type=Pos, default=FIT_DEFAULTS.z_dim, show_default=True),
    click.option("--hidden",       help="Mapper hidden width", metavar="INT", type=Pos, default=FIT_DEFAULTS.hidden, show_default=True),
    click.option("--layers",       help="Mapper linear layers", metavar="INT", type=click.IntRange(min=2), default=FIT_DEFAULTS.layers, show_default=True),
    click.option("--w-plus",       help="Predict one w per style", is_flag=True),
    click.option("--mean-head/--no-mean-head", help="A z-free head predicts E[w | e] (regression), the CVAE adds z's residual", default=FIT_DEFAULTS.mean_head, show_default=True),
    click.option("--mean-weight",  help="Mean head's regression loss weight", metavar="FLOAT", type=FiniteFloatRange(min=0, max=1e3), default=FIT_DEFAULTS.mean_weight, show_default=True),
    click.option("--stop-after",   help="Stop (with a checkpoint) after this many steps in this run; resume later", metavar="INT", type=Pos),
)
BANK = _options(
    click.option("--bank-size",    help="Embeddings in the KNN bank; 0 = all pairs", metavar="INT", type=NonNeg, default=0, show_default=True),
)


# ----------------------------------------------------------------------------
# Stages.


@contextlib.contextmanager
def _errors_as_clicks():
    from t2f.cli_errors import user_errors

    from .run import RunError

    try:
        with user_errors(RunError):
            yield
    except OSError as e:
        # Disk full, permissions: one line naming the file; atomic writes leave nothing partial behind.
        raise click.ClickException(f"cannot write {e.filename or 'the run directory'}: {e.strerror or e}") from None


def _fit_options(kw: dict) -> FitOptions:
    noise_min, noise_max = _range(kw["embed_noise"])
    names = {f.name for f in dataclasses.fields(FitOptions)}
    values = {k: v for k, v in kw.items() if k in names}
    return FitOptions(noise_min=noise_min, noise_max=noise_max, **values)


def _fit_identity(options: FitOptions) -> tuple[dict, dict]:
    d = dataclasses.asdict(options)
    return {k: v for k, v in d.items() if k not in FIT_FREE}, {k: d[k] for k in FIT_FREE}


def _recorded_generator(out: str) -> str | None:
    """The generator name the run's synth stage recorded (None if there is none yet, or the run is unreadable)."""
    from .run import Run, RunError

    try:
        return (Run(out).options().get("synth") or {}).get("generator")
    except (RunError, OSError):
        return None


def _require_out(out):
    if not out:
        raise click.UsageError("--out DIR is required")


class _Context:
    """Loaded models and the run, shared by the stages of one command; holds the run directory's lock while open."""

    def __init__(self, out: str, device: str):
        from t2f.io import directory_lock

        from .run import Run, init_dist

        self.run = Run(out)
        self.run.check_usable()
        self.dist, self.device = init_dist(device)
        self.generator = self.clip = None
        self._lock = contextlib.ExitStack()
        if self.dist.main:                   # one torchrun group per run directory; its rank 0 holds the lock
            self._lock.enter_context(directory_lock(self.run.out, "t2f-train"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._lock.close()

    def load(self, generator: str, clip: str, fingerprint: str | None = None, clip_fingerprint: str | None = None):
        import t2f
        from t2f.io import fingerprint as weights_fingerprint

        from .run import RunError

        self.generator = t2f.load_generator(generator)
        self.generator_name = generator
        self.generator_fingerprint = weights_fingerprint(self.generator)
        if fingerprint is not None and fingerprint != self.generator_fingerprint:
            raise RunError(f"{generator} is not the generator this run's pairs were made with; pass --generator with that one")
        self.clip = t2f.load_clip(clip)
        self.clip_spec = _absolute_spec(clip)
        if clip_fingerprint is not None and clip_fingerprint != self.clip.fingerprint:
            raise RunError(f"CLIP {clip} does not have the weights this run's pairs were embedded with")

    def claim(self, stage: str, identity: dict, extra: dict | None = None, replaceable: bool = False) -> None:
        self.run.claim(stage, identity, extra, write=self.dist.main, replaceable=replaceable)
        self.dist.barrier()


def _absolute_spec(clip: str) -> str:
    """A CLIP spec that still loads from another working directory (a checkpoint path made absolute)."""
    model, sep, rest = clip.partition(":")
    return f"{model}:{os.path.abspath(rest)}" if sep and os.path.isfile(rest) else clip


def _synth_identity(ctx: _Context, kw: dict) -> tuple[dict, dict]:
    identity = dict(generator_fingerprint=ctx.generator_fingerprint, clip=ctx.clip.name, clip_fingerprint=ctx.clip.fingerprint,
                    samples=kw["samples"],
                    shard_size=kw["shard_size"], seed=kw["seed"], downsample=kw["downsample"])
    return identity, dict(generator=ctx.generator_name, clip_spec=ctx.clip_spec, synth_batch=kw["synth_batch"])


def run_synth(ctx: _Context, kw: dict) -> bool:
    from .synth import synth

    identity, extra = _synth_identity(ctx, kw)
    ctx.claim("synth", identity, extra, replaceable=not any(ctx.run.pairs.glob("shard-*.safetensors")))
    if ctx.dist.main:
        ctx.run.clean_stale_temporaries()
    ctx.dist.barrier()
    done = synth(ctx.run, ctx.generator, ctx.clip, dict(identity, generator=ctx.generator_name), ctx.dist, ctx.device,
                 batch_size=kw["synth_batch"], progress=kw["progress"], max_shards=kw["max_shards"])
    if not done and ctx.dist.main:
        click.echo("synth stopped with shards still to make; run the same command again to resume")
    return done


def run_fit(ctx: _Context, kw: dict) -> bool:
    from .fit import check_fit, fit
    from .run import RunError
    from .synth import load_pairs

    options = _fit_options(kw)
    identity, extra = _fit_identity(options)
    synth_section = ctx.run.stage("synth", "run `t2f-train synth` first")
    W, E, manifest = load_pairs(ctx.run)                 # everything is checked before the options are recorded
    if manifest.get("clip_fingerprint") != ctx.clip.fingerprint:
        raise RunError(f"the pairs were embedded with CLIP {manifest.get('clip')}, not these {ctx.clip.name} weights")
    check_fit(W, options, ctx.dist)
    ctx.claim("fit", identity, extra, replaceable=not ctx.run.fit_started())
    if ctx.dist.main:
        ctx.run.clean_stale_temporaries()
    ident = dict(synth_section["identity"], generator=synth_section.get("generator"))
    reached = fit(ctx.run, W, E, ctx.generator, ctx.clip, options, ident, ctx.dist, ctx.device,
                  progress=kw["progress"], stop_after=kw["stop_after"])
    if ctx.dist.main:
        from .report import condition_warning, read_stats

        if reached < options.steps:
            click.echo(f"fit stopped at step {reached} of {options.steps}; run the same command again to resume")
        evals = [e for e in read_stats(ctx.run) if "w_explained" in e]
        if evals:
            last = evals[-1]
            click.echo(f"held-out at step {last['step']}: the embedding explains {last['w_explained']:.0%} of w's variance, "
                       f"z spreads one embedding's faces by {last['z_spread']:.0%} of the data's; report: {ctx.run.out / 'report.html'}")
            if reached == options.steps and (message := condition_warning(last)):
                click.echo(message, err=True)
    return reached == options.steps


def run_bank(ctx: _Context, kw: dict) -> None:
    from t2f.bank import save_bank

    from .synth import load_pairs

    ctx.run.stage("synth", "run `t2f-train synth` first")
    _, E, manifest = load_pairs(ctx.run)
    ctx.claim("bank", dict(bank_size=kw["bank_size"]), replaceable=True)   # the bank is remade from the pairs
    if ctx.dist.main:
        size = kw["bank_size"] or E.shape[0]
        save_bank(ctx.run.bank_path, E[:size], manifest["clip"], manifest["clip_fingerprint"])
        click.echo(f"bank: {min(size, E.shape[0])} embeddings -> {ctx.run.bank_path}")
    ctx.dist.barrier()


def _dry_run(stages: list[str], kw: dict) -> None:
    resolved = {k: v for k, v in kw.items() if k != "dry_run"}
    if "fit" in stages:
        resolved["fit"] = dataclasses.asdict(_fit_options(kw))
    click.echo(json.dumps(dict(stages=stages, options=resolved), indent=2, sort_keys=True, default=str))


def _from_synth(ctx: _Context, kw: dict) -> None:
    """Load the generator and CLIP a run's synth stage used (or --generator, checked by fingerprint)."""
    section = ctx.run.stage("synth", "run `t2f-train synth` first")
    identity = section["identity"]
    ctx.load(kw.get("generator") or section.get("generator"), kw.get("clip") or section.get("clip_spec") or identity["clip"],
             fingerprint=identity["generator_fingerprint"], clip_fingerprint=identity["clip_fingerprint"])


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
    _require_out(kw["out"])
    kw = _apply_budget(kw, kw["generator"])
    if kw["dry_run"]:
        return _dry_run(["synth", "fit", "bank"], kw)
    start = time.perf_counter()
    _fit_options(kw)                           # validate --embed-noise before any work
    with _errors_as_clicks(), _Context(kw["out"], kw["device"]) as ctx:
        fit_identity = _fit_identity(_fit_options(kw))[0]
        ctx.run.claim("fit", fit_identity, write=False, replaceable=not ctx.run.fit_started())
        ctx.run.claim("bank", dict(bank_size=kw["bank_size"]), write=False)
        ctx.load(kw["generator"], kw["clip"])
        ctx.run.claim("synth", _synth_identity(ctx, kw)[0], write=False)
        if not run_synth(ctx, kw) or not run_fit(ctx, kw):
            return
        run_bank(ctx, kw)
    if ctx.dist.main:
        click.echo(f"done in {time.perf_counter() - start:.0f} s: t2f-infer --mapper {kw['out']} --generator {kw['generator']} "
                   f"--clip {kw['clip']} \"a smiling woman\"")


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@COMMON
@SYNTH
def synth(**kw):
    """Stage 1: sample z -> w -> image -> CLIP image embedding, in resumable shards."""
    _require_out(kw["out"])
    kw = _apply_budget(kw, kw["generator"])
    if kw["dry_run"]:
        return _dry_run(["synth"], kw)
    with _errors_as_clicks(), _Context(kw["out"], kw["device"]) as ctx:
        ctx.load(kw["generator"], kw["clip"])
        run_synth(ctx, kw)


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@COMMON
@FIT
@click.option("--generator", help="The run's generator, if it moved [default: as recorded by synth]", metavar="PATH")
@click.option("--clip",      help="The run's CLIP, if its checkpoint moved [default: as recorded by synth]", metavar="SPEC")
def fit(**kw):
    """Stage 2: train the conditional VAE on the pairs (resumes from the checkpoint)."""
    _require_out(kw["out"])
    kw = _apply_budget(kw, _recorded_generator(kw["out"]))
    if kw["dry_run"]:
        return _dry_run(["fit"], kw)
    _fit_options(kw)
    with _errors_as_clicks(), _Context(kw["out"], kw["device"]) as ctx:
        _from_synth(ctx, kw)
        run_fit(ctx, kw)


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@COMMON
@BANK
def bank(**kw):
    """Stage 3: the embedding bank for `t2f-infer --mode knn`."""
    _require_out(kw["out"])
    if kw["dry_run"]:
        return _dry_run(["bank"], kw)
    with _errors_as_clicks(), _Context(kw["out"], kw["device"]) as ctx:
        run_bank(ctx, kw)


@main.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--out", help="Run directory", metavar="DIR", type=click.Path(), required=True, callback=nonempty_path)
def report(out):
    """Write RUN/report.html: loss and held-out metric curves, and the face grids of every evaluation.

    fit writes it too, when it stops or finishes. The page is self-contained (images embedded).
    """
    from .report import write_report
    from .run import Run

    with _errors_as_clicks():
        click.echo(f"report: {write_report(Run(out))}")


if __name__ == "__main__":
    main()
