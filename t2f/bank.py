"""The embedding bank for Fast text2StyleGAN's KNN mode.

A bank holds CLIP image embeddings of generator samples. In KNN mode the condition for a
prompt is not its text embedding but a convex combination of image embeddings near it:
top-K by cosine similarity, a farthest-point pick of M of those, Dirichlet(alpha) weights.
This keeps the mapper's input on the image side of CLIP's text/image gap.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .errors import UsageError
from .files import atomic_path
from .io import WeightsError, safetensors_bytes

BANK_KIND = "t2f-bank"
BANK_NAME = "bank.safetensors"


@dataclasses.dataclass
class Bank:
    embeddings: torch.Tensor      # [N, D] float32, L2-normalized.
    clip: str                     # Name of the CLIP model that made them.
    clip_fingerprint: str         # Its weights' fingerprint (Clip.fingerprint).


def save_bank(path: str | os.PathLike, embeddings: torch.Tensor, clip: str, clip_fingerprint: str) -> None:
    """Store embeddings (as fp16) with the CLIP's name and fingerprint, atomically."""
    e = F.normalize(embeddings.detach().float(), dim=-1).to(torch.float16).cpu().contiguous()
    with atomic_path(path) as tmp:
        tmp.write_bytes(safetensors_bytes({"embeddings": e}, metadata={"kind": BANK_KIND, "clip": clip, "clip_fingerprint": clip_fingerprint}))


def load_bank(path: str | os.PathLike) -> Bank:
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no embedding bank there; make one with `t2f-train bank --out RUN`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != BANK_KIND:
                raise WeightsError(f"{path} is not a t2f embedding bank")
            embeddings = f.get_tensor("embeddings").float()
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise WeightsError(f"{path}: truncated or corrupt bank ({e})") from None
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or not torch.isfinite(embeddings).all():
        raise WeightsError(f"{path}: the bank holds no valid embeddings")
    return Bank(embeddings=embeddings, clip=meta.get("clip", ""), clip_fingerprint=meta.get("clip_fingerprint", ""))


def farthest_points(points: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of m points picked greedily, each the farthest from those already picked; starts at index 0."""
    m = min(m, points.shape[0])
    chosen = [0]
    dist = (points - points[0]).norm(dim=-1)
    for _ in range(m - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, (points - points[nxt]).norm(dim=-1))
    return torch.tensor(chosen)


def knn_condition(
    text: torch.Tensor,           # [P, D] text embeddings, normalized.
    bank: torch.Tensor,           # [N, D] image embeddings, normalized.
    n: int,                       # Conditions per prompt.
    seed: int,                    # Dirichlet draws: image j of prompt i uses the stream (seed, i, j, 1).
    k: int = 50,                  # Nearest bank entries considered.
    m: int = 10,                  # Of those, how many are combined (farthest-point pick).
    alpha: float = 0.3,           # Dirichlet concentration; small = close to one entry.
) -> torch.Tensor:
    """KNN-mode conditions [P * n, D], prompt-major, L2-normalized."""
    bank = bank.to(text.device, torch.float32)
    out = []
    for i, t in enumerate(text.float()):
        top = (bank @ t).topk(min(k, bank.shape[0])).indices      # nearest first
        picked = bank[top[farthest_points(bank[top], m)]]           # [m, D]
        for j in range(n):
            weights = np.random.default_rng([int(seed), i, j, 1]).dirichlet([alpha] * picked.shape[0])
            out.append(torch.from_numpy(weights).to(picked) @ picked)
    return F.normalize(torch.stack(out), dim=-1)


def check_bank(bank: Bank, clip) -> None:
    """ValueError where `bank` was not made with these CLIP weights (its fingerprint) or holds embeddings of another size."""
    if bank.clip_fingerprint != clip.fingerprint:
        raise UsageError(f"the embedding bank was made with CLIP {bank.clip or '?'}, not these {clip.name} weights; "
                         f"use the bank of a run trained with --clip {clip.name}")
    if bank.embeddings.shape[1] != clip.embed_dim:
        raise UsageError(f"the bank holds {bank.embeddings.shape[1]}-d embeddings, CLIP {clip.name} gives {clip.embed_dim}-d")
