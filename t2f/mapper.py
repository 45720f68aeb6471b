"""The mapper: Fast text2StyleGAN's conditional VAE over CLIP embeddings.

Decoder p(w | z, e): (embedding, z) -> an offset from the generator's w_avg, one W vector
broadcast to all styles (or one per style with w_plus). Encoder q(z | w, e): (ws, embedding)
-> (mu, logvar). Our training pairs come from the generator, so the encoder sees the true w
rather than image features. Layers are equalized-lr linear layers with leaky ReLU, as in the
paper's decoder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .io import WeightsError, fingerprint, load_model_dir, save_model_dir
from .config import check_sizes, config_from_dict, shown
from .errors import T2FError, UsageError
from .stylegan2 import FullyConnected, normalize_2nd_moment

MAPPER_KIND = "t2f-mapper"
# Caps far above any mapper t2f trains (CLIP embeddings are at most 1280 wide, StyleGAN2 has at most 26 styles), so
# that a config file cannot describe a model too big to build on the meta device (t2f-train's options use them too).
SIZE_LIMITS = dict(embed_dim=8192, w_dim=8192, num_ws=64, z_dim=8192, hidden=16384)
LAYER_RANGE = (2, 64)


@dataclasses.dataclass(frozen=True)
class MapperConfig:
    embed_dim: int = 512          # CLIP embedding dimension.
    w_dim: int = 512              # Generator's w dimension.
    num_ws: int = 18              # Generator's number of styles.
    z_dim: int = 128              # CVAE latent dimension.
    hidden: int = 512             # Width of the hidden layers.
    layers: int = 4               # Linear layers in the decoder, and in the encoder.
    w_plus: bool = False          # Predict one w per style instead of one broadcast w.
    mean_head: bool = False       # A z-free MLP predicts E[w | e]; the CVAE decoder adds z's residual to it.

    def __post_init__(self):
        check_sizes(self, SIZE_LIMITS)
        if type(self.layers) is not int or not LAYER_RANGE[0] <= self.layers <= LAYER_RANGE[1]:
            raise UsageError(f"layers must be an integer from {LAYER_RANGE[0]} to {LAYER_RANGE[1]}, got {shown(self.layers)}")
        for name in ("w_plus", "mean_head"):
            if type(getattr(self, name)) is not bool:
                raise UsageError(f"{name} must be true or false, got {shown(getattr(self, name))}")

    @property
    def out_dim(self) -> int:
        return self.w_dim * (self.num_ws if self.w_plus else 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MapperConfig":
        return config_from_dict(cls, data)


def _mlp(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    dims = [in_features] + [hidden] * (layers - 1) + [out_features]
    return nn.Sequential(*[
        FullyConnected(dims[i], dims[i + 1], activation="lrelu" if i < layers - 1 else "linear")
        for i in range(layers)
    ])


class Decoder(nn.Module):
    """(condition [batch, embed_dim], z [batch, z_dim]) -> w offset [batch, out_dim]; condition = Mapper.condition(embedding).

    With a mean head the offset is mean(condition) + residual(condition, z): the condition has a
    z-free path of its own, which fit trains by regression to E[w | e], and the CVAE's net adds
    what z leaves open as (net(c, z) - net(c, -z)) / 2. That residual is odd in z, so its mean over
    the prior N(0, I) is exactly zero: the faces a prompt gives are spread around mean(condition),
    and z cannot move their centre away from what the text implies.
    """

    def __init__(self, config: MapperConfig):
        super().__init__()
        self.net = _mlp(config.embed_dim + config.z_dim, config.hidden, config.out_dim, config.layers)
        self.mean = _mlp(config.embed_dim, config.hidden, config.out_dim, config.layers) if config.mean_head else None

    def residual(self, condition: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The z-dependent part of the offset (all of it without a mean head)."""
        z = normalize_2nd_moment(z)
        if self.mean is None:
            return self.net(torch.cat([condition, z], dim=1))
        pair = self.net(torch.cat([torch.cat([condition, z], dim=1), torch.cat([condition, -z], dim=1)]))
        return (pair[:z.shape[0]] - pair[z.shape[0]:]) / 2

    def forward(self, condition: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        residual = self.residual(condition, z)
        return residual if self.mean is None else self.mean(condition) + residual


class Encoder(nn.Module):
    """(w offset [batch, out_dim], condition [batch, embed_dim]) -> (mu, logvar), each [batch, z_dim]."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        self.z_dim = config.z_dim
        self.net = _mlp(config.out_dim + config.embed_dim, config.hidden, 2 * config.z_dim, config.layers)

    def forward(self, w_offset: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([w_offset, condition], dim=1)
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar


def embedding_statistics(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], scale []) of the 2nd-moment-normalized embeddings [N, D]: their mean, and the RMS of their deviation from it.

    CLIP embeddings of one domain (faces) lie close together, so the part that tells them apart is a
    small deviation from a large common direction; standardized, it reaches the decoder at unit scale
    (as z does) instead of drowning in the common part.
    """
    x = normalize_2nd_moment(embeddings.to(torch.float32))
    mean = x.mean(dim=0)
    return mean, (x - mean).square().mean().sqrt().clamp(min=1e-6)


class Mapper(nn.Module):
    """(embedding, z) -> ws [batch, num_ws, w_dim]: w_avg plus the decoder's offset."""

    def __init__(self, config: MapperConfig, w_avg: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.z_dim, self.num_ws, self.w_dim = config.z_dim, config.num_ws, config.w_dim
        self.decoder = Decoder(config)
        self.encoder = Encoder(config)
        self.register_buffer("w_avg", torch.zeros([config.w_dim]) if w_avg is None else w_avg.detach().clone().float())
        # Standardization of the condition, set from the training embeddings (embedding_statistics); 0 and 1 = none.
        self.register_buffer("embed_mean", torch.zeros([config.embed_dim]))
        self.register_buffer("embed_scale", torch.ones([]))

    def condition(self, embedding: torch.Tensor) -> torch.Tensor:
        """CLIP embedding [batch, embed_dim] -> the decoder's and encoder's input: normalized, then standardized."""
        return (normalize_2nd_moment(embedding.to(torch.float32)) - self.embed_mean) / self.embed_scale

    def forward(self, embedding: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.ws(self.decoder(self.condition(embedding), z.to(torch.float32)))

    def ws(self, offset: torch.Tensor) -> torch.Tensor:
        """A decoder offset [batch, out_dim] -> ws [batch, num_ws, w_dim]."""
        offset = offset.reshape(-1, self.num_ws if self.config.w_plus else 1, self.w_dim)
        return (self.w_avg + offset).expand(-1, self.num_ws, -1)

    def w_offset(self, ws: torch.Tensor) -> torch.Tensor:
        """ws [batch, num_ws, w_dim] -> the encoder's input [batch, out_dim]."""
        offset = ws - self.w_avg
        return offset.flatten(1) if self.config.w_plus else offset[:, 0]

    def encode(self, ws: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior q(z | w, e): ws [batch, num_ws, w_dim], embedding [batch, embed_dim] -> (mu, logvar)."""
        return self.encoder(self.w_offset(ws), self.condition(embedding))


def save_mapper(mapper: Mapper, directory: str | os.PathLike, overwrite: bool = False, **extra) -> Path:
    """Write a mapper directory; extra keys (e.g. generator=..., clip=...) go into config.json."""
    return save_model_dir(directory, MAPPER_KIND, mapper.config.to_dict(), mapper.state_dict(), overwrite=overwrite, **extra)


def load_mapper_dir(directory: str | os.PathLike) -> tuple[Mapper, dict]:
    """(mapper, the whole config.json) from a mapper directory."""
    mapper, meta = load_model_dir(directory, MAPPER_KIND, MapperConfig, Mapper)
    return mapper.eval().requires_grad_(False), meta


class MissingMapperError(T2FError):
    """No mapper was given and none is published for the chosen generator and CLIP."""


@dataclasses.dataclass(frozen=True)
class TrainedFor:
    """The generator and CLIP a mapper was trained for, as its config.json records them (t2f-train writes them)."""
    generator: str | None = None              # What was passed to t2f-train --generator: a preset name or a path.
    clip: str | None = None                   # The CLIP's name: MODEL:TAG, MODEL:random, tiny, or MODEL:FILE (a checkpoint's name).
    generator_fingerprint: str | None = None  # t2f.io.fingerprint of the generator's weights; None = not checked.
    clip_fingerprint: str | None = None       # Clip.fingerprint; None = not checked.


def trained_for(meta: dict, source: str) -> TrainedFor:
    """The record in a mapper directory's config.json (`meta`); WeightsError for a malformed one."""
    records = [meta.get(k) or {} for k in ("generator", "clip")]
    if not all(isinstance(r, dict) and all(isinstance(r.get(f), (str, type(None))) for f in ("name", "fingerprint"))
               for r in records):
        raise WeightsError(f"{source}/config.json: malformed generator or clip record")
    (generator, clip) = records
    return TrainedFor(generator=generator.get("name") or None, clip=clip.get("name") or None,
                      generator_fingerprint=generator.get("fingerprint"), clip_fingerprint=clip.get("fingerprint"))


def check_trained_for(record: TrainedFor, source: str, generator, generator_name: str, clip) -> None:
    """Refuse a mapper (`source`, as the user named it) whose record names other generator or CLIP weights."""
    if record.clip_fingerprint not in (None, clip.fingerprint):
        raise WeightsError(f"{source} was trained for CLIP {record.clip}, not these {clip.name} weights; "
                           f"pass --clip {record.clip}")
    if record.generator_fingerprint not in (None, fingerprint(generator)):
        raise WeightsError(f"{source} was trained for generator {record.generator}, not the weights of "
                           f"{generator_name}; pass --generator {record.generator}")
