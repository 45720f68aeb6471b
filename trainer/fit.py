"""Stage 2, fit: train the conditional VAE on the generator's own (w, CLIP image embedding) pairs.

The mapper's decoder has a z-free mean head and a residual that is odd in z (mapper.Decoder): the
mean head is trained by regression to w alone, so it learns E[w | e], and z can spread the faces
of a prompt around it but cannot move their centre. The CVAE terms train the residual, on both
paths. The posterior path (the encoder sees the true w): w reconstruction and a KL (weight with
linear warm-up, divided by z_dim as in Fast text2StyleGAN). The prior path, the one inference
takes (z ~ N(0, I)): an energy score of two decoded prior samples against w, and Fast
text2StyleGAN's CLIP-consistency loss 1 - cos(CLIP(G(w_hat)), e) through the generator and CLIP's
image encoder every k steps, on a prior sample. Trained on the posterior path alone, the decoder
reads w out of z and ignores the embedding (the ablation is in benchmarks/RESULTS.md).
Embedding noise augmentation bridges CLIP's text/image gap (clip2latent), scaled by the training
embeddings' spread, on half of the samples (the other half keeps the clean image embeddings that
KNN and image modes give); the mapper standardizes its embedding input with their mean and
spread. Adam with a cosine schedule (the layers are equalized-lr, so the learning rate is a
relative step of the N(0, 1) weights: 1e-2), an EMA of the weights, a held-out split whose
metrics say whether the embedding and z each do their job (evaluate), and a grid of faces at
each evaluation (report.py).

Every random number of step s comes from a CPU generator seeded with (seed, s), so a run
that is stopped and resumed from its checkpoint takes exactly the steps a straight run takes.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2f.clip import Clip
from t2f.io import write_model_files
from t2f.mapper import MAPPER_KIND, Mapper, MapperConfig, embedding_statistics
from t2f.types import StyleGenerator

from . import report
from .checkpoint import append_stats, check_finite_weights, load_checkpoint, save_checkpoint, truncate_stats
from .config import FitOptions
from .run import Dist, Run, RunError
from .synth import image_embeddings


# ----------------------------------------------------------------------------
# Pure functions.


def get_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 at `total` (steps count from 1)."""
    if warmup and step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_decay(step: int, ema: float) -> float:
    """The EMA decay at a step: (1 + step) / (10 + step), capped at `ema`, so a short run's EMA is not its first weights."""
    return min(ema, (1 + step) / (10 + step))


def augment_embedding(e: torch.Tensor, scale: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """normalize(normalize(e) + scale * unit(direction)); scale [B, 1], direction [B, D]."""
    return F.normalize(F.normalize(e, dim=-1) + scale * F.normalize(direction, dim=-1), dim=-1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q || N(0, I)) per sample, divided by z_dim, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.square() - logvar.exp())).sum(dim=1).mean() / mu.shape[1]


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0]))


def energy_score(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Energy score of two samples [B, 2, ...] per target [B, ...]: E|X - w| - E|X - X'| / 2, per element scale, batch mean.

    A strictly proper scoring rule: its expectation is smallest when the samples' distribution is the
    true conditional distribution of w, so it trains the mean towards E[w | e] without pulling the
    samples together (an MSE on prior samples would, and z would stop mattering).
    """
    a, b, t = samples[:, 0].flatten(1), samples[:, 1].flatten(1), target.flatten(1)

    def norm(x):
        return (x.square().sum(dim=1) + 1e-12).sqrt()

    return ((norm(a - t) + norm(b - t)) / 2 - norm(a - b) / 2).mean() / math.sqrt(t.shape[1])


# ----------------------------------------------------------------------------
# The model pass and its loss.


class CVAEPass(nn.Module):
    """One training pass, both paths of the CVAE.

    (w [B, w_dim], embedding [B, D], eps [B, z_dim], z_prior [B, k, z_dim]) ->
    (ws_hat [B, num_ws, w_dim] through the posterior, mu, logvar, ws_prior [B, k, num_ws, w_dim] through the prior)
    """

    def __init__(self, mapper: Mapper):
        super().__init__()
        self.mapper = mapper

    def forward(self, w: torch.Tensor, embedding: torch.Tensor, eps: torch.Tensor, z_prior: torch.Tensor):
        m = self.mapper
        ws = w.unsqueeze(1).expand(-1, m.num_ws, -1)
        mu, logvar = m.encode(ws, embedding)
        z = mu + (0.5 * logvar).exp() * eps
        b, k = z_prior.shape[:2]
        condition = m.condition(embedding)
        # With a mean head, regression alone trains it: the CVAE terms see it detached and train the residual.
        mean = m.decoder.mean(condition) if m.decoder.mean is not None else None
        base = mean.detach() if mean is not None else condition.new_zeros([b, 1])
        residual_prior = m.decoder.residual(condition.repeat_interleave(k, dim=0), z_prior.flatten(0, 1))
        ws_prior = m.ws(base.repeat_interleave(k, dim=0) + residual_prior).unflatten(0, (b, k))
        ws_hat = m.ws(base + m.decoder.residual(condition, z))
        return ws_hat, mu, logvar, ws_prior, (None if mean is None else m.ws(mean))


class FitLoss:
    """The fit loss: a callable that returns its named terms and their weighted sum, `loss` (EDM's loss classes).

    loss_fn(model, w, embedding, condition, eps, z_prior, step) -> {"loss", "reconstruction", "kl", "prior",
    and "regression" with a mean head, "clip_loss" on the steps that take the CLIP-consistency loss}, each a scalar tensor.
    model is a CVAEPass (or its DDP wrapper); embedding [B, D] the pairs' clean embeddings, condition [B, D] the
    augmented ones the mapper sees; eps [B, z_dim] and z_prior [B, 2, z_dim] the step's latents.
    """

    def __init__(self, generator: StyleGenerator, clip: Clip | None, *,
                 kl: float,                 # KL weight after its warm-up (the KL is divided by z_dim).
                 kl_warmup: int,            # Steps over which the KL weight ramps up from 0; 0 = none.
                 prior_weight: float,       # Weight of the prior path's energy score.
                 mean_weight: float,        # Weight of the mean head's regression (unused without a mean head).
                 clip_weight: float,        # Weight of the CLIP-consistency loss.
                 clip_every: int,           # Take it every k steps; 0 = never (and never without CLIP).
                 clip_batch: int,           # Samples that go through G and CLIP for it.
                 clip_prior: bool,          # On a prior sample (as at inference) rather than the posterior's.
                 downsample: int = 0):      # Area-resize G's images to this size before CLIP; 0 = CLIP's resize only.
        self.generator, self.clip = generator, clip
        self.kl, self.kl_warmup, self.prior_weight, self.mean_weight = kl, kl_warmup, prior_weight, mean_weight
        self.clip_weight, self.clip_every, self.clip_batch, self.clip_prior = clip_weight, clip_every, clip_batch, clip_prior
        self.downsample = downsample

    @classmethod
    def from_options(cls, options: FitOptions, generator: StyleGenerator, clip: Clip | None, downsample: int = 0) -> FitLoss:
        o = options
        return cls(generator, clip, kl=o.kl, kl_warmup=o.kl_warmup, prior_weight=o.prior_weight, mean_weight=o.mean_weight,
                   clip_weight=o.clip_weight, clip_every=o.clip_every, clip_batch=o.clip_batch, clip_prior=o.clip_prior,
                   downsample=downsample)

    def kl_weight(self, step: int) -> float:
        return self.kl * (min(1.0, step / self.kl_warmup) if self.kl_warmup else 1.0)

    def __call__(self, model: nn.Module, w: torch.Tensor, embedding: torch.Tensor, condition: torch.Tensor,
                 eps: torch.Tensor, z_prior: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        ws_hat, mu, logvar, ws_prior, ws_mean = model(w, condition, eps, z_prior)
        terms = dict(reconstruction=(ws_hat - w.unsqueeze(1)).square().mean(),
                     kl=kl_divergence(mu, logvar),
                     prior=energy_score(ws_prior, w.unsqueeze(1).expand(-1, ws_hat.shape[1], -1)))
        loss = terms["reconstruction"] + self.kl_weight(step) * terms["kl"] + self.prior_weight * terms["prior"]
        if ws_mean is not None:
            terms["regression"] = (ws_mean - w.unsqueeze(1)).square().mean()
            loss = loss + self.mean_weight * terms["regression"]
        if self.clip_every and self.clip is not None and step % self.clip_every == 0:
            n = min(self.clip_batch, w.shape[0])
            e_hat = image_embeddings(self.generator, self.clip, (ws_prior[:n, 0] if self.clip_prior else ws_hat[:n]), self.downsample)
            terms["clip_loss"] = (1 - (e_hat * F.normalize(embedding[:n], dim=-1)).sum(-1)).mean()
            loss = loss + self.clip_weight * terms["clip_loss"]
        return dict(loss=loss, **terms)


# ----------------------------------------------------------------------------
# Metrics.


EVAL_SAMPLES = 16   # Prior samples of z per held-out embedding.


@torch.no_grad()
def evaluate(mapper: Mapper, w: torch.Tensor, e: torch.Tensor, w_mean: torch.Tensor, generator: StyleGenerator | None,
             clip: Clip | None, downsample: int, seed: int) -> dict:
    """Held-out metrics of a mapper on pairs (w [N, w_dim], e [N, D]), through the path inference takes: z ~ N(0, I).

    The embedding-only prediction of w is the mean of EVAL_SAMPLES decoded prior samples (the same z for every pair,
    in antithetic pairs z and -z).
    w_explained = 1 - w_error / w_error_mean_baseline is the share of w's variance the embedding explains;
    z_spread is the variance of w over z for one embedding, relative to the data's (both summed over w's elements).
    For a model whose z covers exactly what the embedding leaves open, z_spread is about 1 - w_explained.
    """
    n, k = w.shape[0], EVAL_SAMPLES
    z = torch.randn([k // 2, mapper.z_dim], generator=step_generator(seed, 0)).to(w.device)  # step 0 is never a training step
    z = torch.cat([z, -z])     # antithetic pairs: an unbiased estimate of the mean over z with less Monte Carlo error
    samples = mapper(e.repeat_interleave(k, dim=0), z.repeat(n, 1))[:, 0].reshape(n, k, -1)   # [N, k, w_dim]
    prediction = samples.mean(dim=1)
    baseline = (w_mean - w).square().mean().item()
    w_error = (prediction - w).square().mean().item()
    ws = w.unsqueeze(1).expand(-1, mapper.num_ws, -1)
    mu, _ = mapper.encode(ws, e)
    stats = dict(
        w_error=w_error,                                                       # embedding only, mean over z
        w_error_mean_baseline=baseline,                                        # predicting the training mean w
        w_error_posterior=(mapper(e, mu)[:, 0] - w).square().mean().item(),    # through the encoder's mean
        w_explained=1 - w_error / baseline,
        z_spread=(samples - prediction.unsqueeze(1)).square().mean().item() * k / (k - 1) / baseline,
    )
    if generator is not None and clip is not None:
        count = min(16, e.shape[0])
        e_hat = image_embeddings(generator, clip, samples[:count, 0].unsqueeze(1).expand(-1, mapper.num_ws, -1), downsample)
        e_true = image_embeddings(generator, clip, ws[:count], downsample)
        stats["clip_consistency"] = (e_hat * e[:count]).sum(-1).mean().item()        # cos(CLIP(G(w_hat)), e), one prior z
        stats["clip_consistency_ceiling"] = (e_true * e[:count]).sum(-1).mean().item()  # cos(CLIP(G(w)), e)
    return stats


# ----------------------------------------------------------------------------
# The stage.


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise RunError(f"{n} pairs are too few to hold out {n_val}; make more with synth")
    return perm[n_val:], perm[:n_val]


def check_fit(W: torch.Tensor, options: FitOptions, dist: Dist) -> None:
    """Refuse options that cannot train on these pairs, before anything is recorded or written."""
    if options.batch % dist.world:
        raise RunError(f"--batch {options.batch} is not divisible by the {dist.world} torchrun processes")
    _split(W.shape[0], options.val_fraction, options.seed)


def all_finite(loss: torch.Tensor, dist: Dist) -> bool:
    """Whether the loss is finite on every torchrun process (all stop together, none waits in an all-reduce)."""
    ok = torch.isfinite(loss.detach()).all().float()
    if dist.world > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


class StepDraw(NamedTuple):
    """Every random number of one step, for the global batch; each torchrun process takes its slice."""
    idx: torch.Tensor          # [batch] training pairs
    scale: torch.Tensor        # [batch, 1] embedding noise scale (0 for the clean share)
    direction: torch.Tensor    # [batch, D] embedding noise direction
    eps: torch.Tensor          # [batch, z_dim] the posterior's reparameterization noise
    z_prior: torch.Tensor      # [batch, 2, z_dim] two prior samples per pair


def draw_step(o: FitOptions, step: int, pairs: int, embed_dim: int, noise_unit: float) -> StepDraw:
    """The step's random numbers, from the CPU generator seeded with (seed, step), in a fixed order."""
    g = step_generator(o.seed, step)
    idx = torch.randint(pairs, [o.batch], generator=g)
    scale = noise_unit * (o.noise_min + (o.noise_max - o.noise_min) * torch.rand([o.batch, 1], generator=g))
    scale = scale * (torch.rand([o.batch, 1], generator=g) < o.noise_share)
    direction = torch.randn([o.batch, embed_dim], generator=g)
    eps = torch.randn([o.batch, o.z_dim], generator=g)
    z_prior = torch.randn([o.batch, 2, o.z_dim], generator=g)
    return StepDraw(idx, scale, direction, eps, z_prior)


def new_mapper(config: MapperConfig, generator: StyleGenerator, E_train: torch.Tensor, o: FitOptions) -> tuple[Mapper, float]:
    """The mapper at initialization (seeded), standardized with the training embeddings; and the embedding noise's unit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        mapper = Mapper(config, w_avg=generator.w_avg.cpu())
    mean, spread = embedding_statistics(E_train)   # spread: RMS distance of the unit embeddings from their mean
    if o.standardize:
        mapper.embed_mean.copy_(mean)
        mapper.embed_scale.copy_(spread)
    return mapper, (spread.item() if o.noise_relative else 1.0)


def _grid_rows(val_w: torch.Tensor, val_e: torch.Tensor, num_ws: int, clip: Clip | None, main: bool, device: torch.device):
    """The fixed rows of the progress grids: the prompts (through CLIP's text encoder) and a few held-out pairs.

    Returns (conditions [rows, D], truths [held-out rows, num_ws, w_dim], whether the prompts are there).
    """
    rows = [val_e[:report.HELD_OUT_ROWS]]
    if main and clip is not None:
        with torch.no_grad():
            rows.insert(0, clip.encode_text(list(report.PROMPTS)).to(device))
    return torch.cat(rows), val_w[:report.HELD_OUT_ROWS].unsqueeze(1).expand(-1, num_ws, -1), len(rows) == 2


def fit(run: Run, W: torch.Tensor, E: torch.Tensor, generator: StyleGenerator, clip: Clip | None, options: FitOptions,
        identity: dict, dist: Dist, device: torch.device, progress: bool = True, stop_after: int | None = None) -> int:
    """Train (or resume) the mapper for all its steps, or `stop_after` more; returns the step reached.

    When that is the last step, the mapper (EMA weights) is written into the run directory.
    """
    o = options
    check_fit(W, o, dist)
    train_idx, val_idx = _split(W.shape[0], o.val_fraction, o.seed)
    config = MapperConfig(embed_dim=E.shape[1], w_dim=W.shape[1], num_ws=generator.num_ws, z_dim=o.z_dim,
                          hidden=o.hidden, layers=o.layers, w_plus=o.w_plus,
                          mean_head=o.mean_head)
    mapper, noise_unit = new_mapper(config, generator, E[train_idx], o)
    ema = copy.deepcopy(mapper).requires_grad_(False)
    # On the device before the optimizer exists: its loaded state then lands beside the parameters.
    mapper.to(device).train()
    ema.to(device).eval()
    optimizer = torch.optim.Adam(mapper.parameters(), lr=o.lr, betas=(0.9, 0.99))
    start = load_checkpoint(run, mapper, ema, optimizer)
    if dist.main:
        truncate_stats(run, start)
        report.remove_grids_after(run, start)

    generator.to(device).eval().requires_grad_(False)
    if clip is not None:
        clip.to(device)
    model = CVAEPass(mapper)
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    W_train, E_train = W[train_idx], E[train_idx]
    w_mean = W_train.mean(dim=0).to(device)
    val_w, val_e = W[val_idx][:1024].to(device), E[val_idx][:1024].to(device)
    per_rank = o.batch // dist.world
    mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    downsample = identity.get("downsample", 0)
    end = o.steps if stop_after is None else min(o.steps, start + stop_after)
    loss_fn = FitLoss.from_options(o, generator, clip, downsample)

    grid_conditions, grid_truths, has_prompts = _grid_rows(val_w, val_e, generator.num_ws, clip, dist.main, device)
    grid_z = report.grid_latents(o.z_dim, o.seed)
    if dist.main:
        report.write_grid_layout(run, report.grid_layout(has_prompts, grid_truths.shape[0]))

    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=o.steps, initial=start, unit="step", desc="fit", disable=not progress or not dist.main) as bar:
        for step in range(start + 1, end + 1):
            draw = draw_step(o, step, W_train.shape[0], E.shape[1], noise_unit)
            w, e = W_train[draw.idx][mine].to(device), E_train[draw.idx][mine].to(device)
            e_aug = augment_embedding(e, draw.scale[mine].to(device), draw.direction[mine].to(device))
            terms = loss_fn(model, w, e, e_aug, draw.eps[mine].to(device), draw.z_prior[mine].to(device), step)

            if not all_finite(terms["loss"], dist):
                raise RunError(f"fit step {step}: the loss is not finite (reconstruction {terms['reconstruction'].item():.4g}, "
                               f"kl {terms['kl'].item():.4g}, prior {terms['prior'].item():.4g}); stopped before writing "
                               "anything from this step; resume from the last checkpoint with a lower --lr")
            lr = get_lr(step, o.steps, o.lr, o.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), mapper.parameters()):
                    p_ema.lerp_(p, 1 - ema_decay(step, o.ema))
            bar.update(1)

            is_eval = step % o.eval_every == 0 or step == o.steps
            if step % o.log_every == 0 or is_eval:
                entry = dict(step=step, lr=lr, kl_weight=loss_fn.kl_weight(step), steps_per_s=(step - start) / (time.perf_counter() - t0),
                             **{name: value.item() for name, value in terms.items()})
                if is_eval:
                    entry.update(evaluate(ema, val_w, val_e, w_mean, generator, clip, downsample, o.seed))
                    if step == o.steps and (message := report.condition_warning(entry)):
                        entry["warning"] = message
                    if dist.main:
                        report.write_grid(run, step, report.face_grid(ema, generator, grid_conditions, grid_truths, grid_z))
                if dist.main:
                    append_stats(run, entry)
            if step % o.checkpoint_every == 0 or step == end:
                save_checkpoint(run, step, mapper, ema, optimizer, dist)

    if end == o.steps and dist.main:
        check_finite_weights(ema, "EMA", end)
        write_model_files(run.out, MAPPER_KIND, config.to_dict(), ema.state_dict(),
                          generator=dict(name=identity["generator"], fingerprint=identity["generator_fingerprint"]),
                          clip=dict(name=identity["clip"], fingerprint=identity["clip_fingerprint"]))
    if dist.main and report.read_stats(run):        # nothing to show before the first stats line
        path = report.write_report(run)
        if not report.can_plot():
            print(f"note: {path}: {report.NO_MATPLOTLIB}", file=sys.stderr)
    dist.barrier()
    return end
