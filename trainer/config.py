"""What a training run is asked to do: one frozen dataclass per stage, gathered in `TrainConfig`.

`t2f.trainer.train(out, config, stages)` takes a `TrainConfig`; `t2f-train` builds one from its
options (and `--dry-run` prints it). The options that define a stage's result (its identity) are
recorded in the run's options.json and must match when the run is resumed; the others (budgets
of this call, logging) may change.
"""

from __future__ import annotations

import dataclasses

from t2f.config import shown
from t2f.errors import UsageError
from t2f.mapper import LAYER_RANGE, SIZE_LIMITS

STAGES = ("synth", "fit", "bank")

# What each size and count may be: far above any real run, so that a slip (--batch 1000000000000) is one line
# before anything is written, not an allocation that fails inside a stage. t2f-train's options take these ranges.
COUNT = 10**9                          # samples, steps, warm-ups, intervals, bank embeddings
SEED = 2**64 - 1                       # torch's generators take seeds below 2^64
RANGES = dict(
    synth=dict(samples=(1, COUNT), shard_size=(1, 10**6), batch=(1, 4096), downsample=(0, 8192), seed=(0, SEED),
               max_shards=(1, 10**6)),
    fit=dict(steps=(1, COUNT), batch=(1, 65536), warmup=(0, COUNT), kl_warmup=(0, COUNT), clip_every=(0, COUNT),
             clip_batch=(1, 4096), checkpoint_every=(1, COUNT), log_every=(1, COUNT), eval_every=(1, COUNT),
             z_dim=(1, SIZE_LIMITS["z_dim"]), hidden=(1, SIZE_LIMITS["hidden"]), layers=LAYER_RANGE, seed=(0, SEED)),
    bank=dict(size=(0, COUNT)),
    run=dict(stop_after=(1, COUNT)),
)


def check_ranges(options, section: str) -> None:
    """ValueError (one line) naming the first field of `options` outside RANGES[section] (None: an optional limit left off)."""
    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    for name, (low, high) in RANGES[section].items():
        value = getattr(options, name)
        if value is None and defaults[name] is None:                   # an optional limit left off (max_shards, stop_after)
            continue
        if type(value) is not int or not low <= value <= high:
            raise UsageError(f"{type(options).__name__}.{name} must be an integer from {low} to {high}, got {shown(value)}")


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    samples: int = 100_000             # Pairs to synthesize.
    shard_size: int = 5000             # Pairs per shard (the unit of resumption).
    batch: int = 16                    # Images per synth batch (float rounding depends on it, about 1e-6).
    downsample: int = 256              # Area-resize images to this size before CLIP; 0 = CLIP's resize only.
    seed: int = 0                      # Sample i's z comes from the stream (seed, i).
    max_shards: int | None = None      # Stop after this many new shards, per process (resume later); None = all.

    def __post_init__(self):
        check_ranges(self, "synth")


@dataclasses.dataclass(frozen=True)
class FitOptions:
    steps: int = 20000                 # Optimizer steps.
    batch: int = 256                   # Global batch size (split across torchrun ranks).
    lr: float = 1e-2                   # Peak learning rate (Adam; the layers are equalized-lr: weights ~ N(0, 1), scaled at run time).
    warmup: int = 500                  # Linear learning-rate warm-up steps; 0 = none.
    kl: float = 0.2                    # KL weight (the KL is divided by z_dim).
    kl_warmup: int = 2000              # Steps over which the KL weight ramps up from 0; 0 = none.
    prior_weight: float = 1.0          # Weight of the prior-path loss (energy score of decoded z ~ N(0, I) against w); 0 = plain CVAE.
    noise_min: float = 0.0             # Embedding noise scale, drawn uniformly in [noise_min, noise_max] per sample,
    noise_max: float = 1.5             # in units of the training embeddings' spread (noise_relative) or absolute.
    noise_share: float = 0.5           # Share of the samples that get noise; the rest keep their clean embedding.
    noise_relative: bool = True        # Scale the noise by the spread: the same signal-to-noise ratio for every CLIP and domain.
    standardize: bool = True           # Standardize the mapper's embedding input with the training pairs' mean and spread.
    clip_weight: float = 1.0           # Weight of the CLIP-consistency loss.
    clip_every: int = 10               # Apply it every k steps; 0 = never.
    clip_batch: int = 8                # Samples that go through G and CLIP for it.
    clip_prior: bool = True            # Apply it to a prior sample (z ~ N(0, I), as at inference) rather than the posterior's.
    ema: float = 0.999                 # EMA decay of the mapper's weights (lower in the first steps: ema_decay).
    val_fraction: float = 0.02         # Held-out share of the pairs (at least one pair).
    checkpoint_every: int = 1000       # Steps between checkpoints (also at the end and at --stop-after).
    log_every: int = 100               # Steps between loss lines in stats.jsonl.
    eval_every: int = 1000             # Steps between held-out metrics (also at the end).
    z_dim: int = 128                   # Mapper: CVAE latent size.
    hidden: int = 512                  # Mapper: hidden width.
    layers: int = 4                    # Mapper: linear layers in decoder and encoder.
    w_plus: bool = False               # Mapper: one w per style.
    mean_head: bool = True             # Mapper: a z-free head for E[w | e], trained by regression; z's part is odd in z.
    mean_weight: float = 1.0           # Weight of the mean head's regression loss (MSE against w).
    seed: int = 0                      # Initialization, split and every step's random numbers.

    def __post_init__(self):
        check_ranges(self, "fit")


@dataclasses.dataclass(frozen=True)
class BankOptions:
    size: int = 0                      # Embeddings in the KNN bank; 0 = all pairs.

    def __post_init__(self):
        check_ranges(self, "bank")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    generator: str | None = None       # Preset, directory, NVIDIA .pkl or rosinality .pt; None = the one the run's synth recorded (synth needs one).
    clip: str | None = None            # open_clip MODEL:TAG, MODEL:/path or tiny; None = as the run's synth recorded (synth needs one).
    device: str = "auto"               # auto, cpu, cuda or cuda:N (torchrun: one GPU per process).
    progress: bool = True              # Progress bars.
    stop_after: int | None = None      # Stop fit (with a checkpoint) after this many steps in this call; None = run to the end.
    synth: SynthOptions = SynthOptions()
    fit: FitOptions = FitOptions()
    bank: BankOptions = BankOptions()

    def __post_init__(self):
        check_ranges(self, "run")

    def to_dict(self, stages=STAGES) -> dict:
        """The config as JSON-ready values, with the sections of `stages` only."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in STAGES or k in stages}


# ----------------------------------------------------------------------------
# Budgets: what a real generator needs, and the random-weight presets' (a first run on the
# tiny models takes a few minutes on an idle 2-core CPU). Explicit options override them.

BUDGET = dict(samples=SynthOptions.samples, steps=FitOptions.steps, eval_every=FitOptions.eval_every)
PRESET_BUDGETS = {
    "tiny": dict(samples=10_000, steps=1500, eval_every=250),
}


def budget(generator: str | None) -> dict:
    """samples, steps and eval_every for a generator preset name (the real-generator budget for anything else)."""
    return PRESET_BUDGETS.get(generator, BUDGET)


# ----------------------------------------------------------------------------
# Identity: the options recorded in options.json that a resumed run must match.

# Fit options that do not change the trained weights: they may differ when a run is resumed.
FIT_FREE = ("checkpoint_every", "log_every", "eval_every")


def fit_identity(options: FitOptions) -> tuple[dict, dict]:
    """(identity, free): the fit options that define the trained weights, and those that do not."""
    d = dataclasses.asdict(options)
    return {k: v for k, v in d.items() if k not in FIT_FREE}, {k: d[k] for k in FIT_FREE}
