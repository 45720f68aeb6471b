"""`train(out, config, stages)`: the library entry of t2f-train, what the command, torchrun and a notebook call.

    import t2f.trainer as T
    config = T.TrainConfig(generator="tiny", clip="tiny", synth=T.SynthOptions(samples=2000), fit=T.FitOptions(steps=300))
    T.train("runs/tiny", config)                        # synth, fit and bank; call again to resume
    T.train("runs/tiny", config, stages=["fit"])        # one stage: its generator and CLIP as the run recorded them

A `Session` holds what the stages of one call share: the run directory (and its lock, held by
rank 0 while the session is open), the torchrun process info, and the loaded generator and CLIP,
checked by fingerprint against what the run's pairs were made with. Before any work, every
stage asked for has its options checked against the ones the run recorded. User errors are
`RunError` (and the loaders' errors); `t2f-train` shows them as one line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence

from t2f.errors import UsageError

from .card import CARD_NAME, write_card
from .config import STAGES, TrainConfig, fit_identity
from .run import Run, RunError, init_dist


class Session:
    """Loaded models and the run, shared by the stages of one call; holds the run directory's lock while open."""

    def __init__(self, out: str | os.PathLike, device: str):
        from t2f.private import directory_lock

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

        self.generator = t2f.load_generator(generator)
        self.generator_name = generator
        self.generator_fingerprint = weights_fingerprint(self.generator)
        if fingerprint is not None and fingerprint != self.generator_fingerprint:
            raise RunError(f"{generator} is not the generator this run's pairs were made with; pass --generator with that one")
        self.clip = t2f.load_clip(clip)
        self.clip_spec = _absolute_spec(clip)
        if clip_fingerprint is not None and clip_fingerprint != self.clip.fingerprint:
            raise RunError(f"CLIP {clip} does not have the weights this run's pairs were embedded with")

    def load_from_synth(self, generator: str | None, clip: str | None) -> None:
        """Load the generator and CLIP the run's synth stage used (or those given, checked by fingerprint)."""
        section = self.run.stage("synth", "run `t2f-train synth` first")
        identity = section["identity"]
        self.load(generator or section.get("generator"), clip or section.get("clip_spec") or identity["clip"],
                  fingerprint=identity["generator_fingerprint"], clip_fingerprint=identity["clip_fingerprint"])

    def claim(self, stage: str, identity: dict, extra: dict | None = None, replaceable: bool = False) -> None:
        self.run.claim(stage, identity, extra, write=self.dist.main, replaceable=replaceable)
        self.dist.barrier()

    def say(self, message: str, err: bool = False) -> None:
        """A line for the user, from rank 0 only."""
        if self.dist.main:
            print(message, file=sys.stderr if err else sys.stdout, flush=True)


def _absolute_spec(clip: str) -> str:
    """A CLIP spec that still loads from another working directory (a checkpoint path made absolute)."""
    model, sep, rest = clip.partition(":")
    return f"{model}:{os.path.abspath(rest)}" if sep and os.path.isfile(rest) else clip


def synth_identity(session: Session, config: TrainConfig) -> tuple[dict, dict]:
    """(identity, extra) of the synth stage as options.json records it; the models must be loaded."""
    s = config.synth
    identity = dict(generator_fingerprint=session.generator_fingerprint, clip=session.clip.name,
                    clip_fingerprint=session.clip.fingerprint, samples=s.samples,
                    shard_size=s.shard_size, seed=s.seed, downsample=s.downsample)
    return identity, dict(generator=session.generator_name, clip_spec=session.clip_spec, synth_batch=s.batch)


def bank_identity(config: TrainConfig) -> dict:
    return dict(bank_size=config.bank.size)


# ----------------------------------------------------------------------------
# Stages: each returns whether it is complete.


def run_synth(session: Session, config: TrainConfig) -> bool:
    from .synth import synth

    identity, extra = synth_identity(session, config)
    session.claim("synth", identity, extra, replaceable=not any(session.run.pairs.glob("shard-*.safetensors")))
    if session.dist.main:
        session.run.clean_stale_temporaries()
    session.dist.barrier()
    done = synth(session.run, session.generator, session.clip, dict(identity, generator=session.generator_name), session.dist,
                 session.device, batch_size=config.synth.batch, progress=config.progress, max_shards=config.synth.max_shards)
    if not done:
        session.say("synth stopped with shards still to make; run the same command again to resume")
    return done


def run_fit(session: Session, config: TrainConfig) -> bool:
    from .fit import check_fit, fit
    from .report import condition_warning, read_stats
    from .synth import load_pairs

    options, run = config.fit, session.run
    identity, extra = fit_identity(options)
    synth_section = run.stage("synth", "run `t2f-train synth` first")
    W, E, manifest = load_pairs(run)                 # everything is checked before the options are recorded
    if manifest.get("clip_fingerprint") != session.clip.fingerprint:
        raise RunError(f"the pairs were embedded with CLIP {manifest.get('clip')}, not these {session.clip.name} weights")
    check_fit(W, options, session.dist)
    session.claim("fit", identity, extra, replaceable=not run.fit_started())
    if session.dist.main:
        run.clean_stale_temporaries()
    pairs_identity = dict(synth_section["identity"], generator=synth_section.get("generator"))
    reached = fit(run, W, E, session.generator, session.clip, options, pairs_identity, session.dist, session.device,
                  progress=config.progress, stop_after=config.stop_after)
    if session.dist.main:
        if reached < options.steps:
            session.say(f"fit stopped at step {reached} of {options.steps}; run the same command again to resume")
        evals = [e for e in read_stats(run) if "w_explained" in e]
        if evals:
            last = evals[-1]
            session.say(f"held-out at step {last['step']}: the embedding explains {last['w_explained']:.0%} of w's variance, "
                        f"z spreads one embedding's faces by {last['z_spread']:.0%} of the data's; report: {run.out / 'report.html'}")
            if reached == options.steps and (message := condition_warning(last)):
                session.say(message, err=True)
    return reached == options.steps


def run_bank(session: Session, config: TrainConfig) -> bool:
    from t2f.bank import save_bank

    from .synth import load_pairs

    session.run.stage("synth", "run `t2f-train synth` first")
    _, E, manifest = load_pairs(session.run)
    session.claim("bank", bank_identity(config), replaceable=True)   # the bank is remade from the pairs
    if session.dist.main:
        size = config.bank.size or E.shape[0]
        save_bank(session.run.bank_path, E[:size], manifest["clip"], manifest["clip_fingerprint"])
        session.say(f"bank: {min(size, E.shape[0])} embeddings -> {session.run.bank_path}")
    session.dist.barrier()
    return True


RUNNERS = dict(synth=run_synth, fit=run_fit, bank=run_bank)


# ----------------------------------------------------------------------------
# The entry point.


def check_stages(stages: Sequence[str]) -> list[str]:
    """The stages asked for, in their order (synth, fit, bank); ValueError for an unknown or repeated one."""
    stages = [stages] if isinstance(stages, str) else list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages or len(set(stages)) != len(stages):
        raise UsageError(f"stages must be distinct names among {', '.join(STAGES)}; got {stages!r}")
    return [s for s in STAGES if s in stages]


def train(out: str | os.PathLike, config: TrainConfig, stages: Sequence[str] = STAGES) -> bool:
    """Run (or resume) the stages of a training run in `out`; True when every one of them is complete.

    Each stage resumes where it stopped; a stage left incomplete (synth's max_shards, fit's stop_after)
    ends the call. synth needs config.generator and config.clip; fit and bank take the run's own
    when those are None. Under torchrun, every process calls it with the same arguments.
    Raises RunError for a run that cannot be used as asked (another run's options, missing stages, bad files).
    """
    stages = check_stages(stages)
    start = time.perf_counter()
    with Session(out, config.device) as session:
        run = session.run
        if len(stages) > 1:                # nothing is done before every stage's options are checked against the run
            if "fit" in stages:
                run.claim("fit", fit_identity(config.fit)[0], write=False, replaceable=not run.fit_started())
            if "bank" in stages:
                run.claim("bank", bank_identity(config), write=False)
        if "synth" in stages:
            if config.generator is None or config.clip is None:
                raise RunError("the synth stage needs a generator and a CLIP")
            session.load(config.generator, config.clip)
            if len(stages) > 1:
                run.claim("synth", synth_identity(session, config)[0], write=False)
        elif "fit" in stages:
            session.load_from_synth(config.generator, config.clip)
        for stage in stages:
            complete = RUNNERS[stage](session, config)
            if session.dist.main:
                write_card(run)              # README.md, the run's model card: what the run holds now
            if not complete:
                return False
    if stages == list(STAGES):
        session.say(f"done in {time.perf_counter() - start:.0f} s: t2f-infer --mapper {out} \"a smiling woman\" "
                    f"(model card: {run.out / CARD_NAME}; publishing it: the t2f project's docs/publishing.md)")
    return True
