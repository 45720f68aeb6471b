"""Stage 1, synth: the generator makes its own training data.

Sample i draws z from numpy's generator seeded with (seed, i) (`t2f.latents`), maps it to w (psi 1),
synthesizes the image and embeds it with CLIP's image encoder. Pairs (w, embedding, index)
are stored in shards of `shard_size` samples. A shard is written to a temporary file and
renamed, so a killed run leaves whole shards only; a resumed run skips the shards on disk.
Under torchrun, shard k belongs to rank k % world_size.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from t2f.clip import Clip
from t2f.files import atomic_path, write_json
from t2f.io import safetensors_bytes
from t2f.latents import seeded_latents
from t2f.types import StyleGenerator

from .run import Dist, Run, RunError, read_run_json

SHARD_KIND = "t2f-pairs"


def image_embeddings(generator: StyleGenerator, clip: Clip, ws: torch.Tensor, downsample: int = 0) -> torch.Tensor:
    """ws [B, num_ws, w_dim] -> CLIP image embeddings [B, D] of G(ws) (constant noise); differentiable.

    downsample > 0 area-resizes the image to that size before CLIP's own preprocessing.
    """
    img = generator.synthesis(ws, noise_mode="const")
    if downsample and img.shape[-1] > downsample:
        img = F.interpolate(img, size=(downsample, downsample), mode="area")
    return clip.encode_image(img)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def synth(run: Run, generator: StyleGenerator, clip: Clip, identity: dict, dist: Dist, device: torch.device,
          batch_size: int, progress: bool = True, max_shards: int | None = None) -> bool:
    """Make the missing shards of this rank (at most max_shards of them); True when the whole set is on disk."""
    samples, shard_size, seed, downsample = identity["samples"], identity["shard_size"], identity["seed"], identity["downsample"]
    num_shards = math.ceil(samples / shard_size)
    run.pairs.mkdir(parents=True, exist_ok=True)
    todo = [k for k in range(dist.rank, num_shards, dist.world) if not (run.pairs / shard_name(k)).exists()]
    if max_shards is not None:
        todo = todo[:max_shards]
    total = sum(min(samples, (k + 1) * shard_size) - k * shard_size for k in todo)

    from tqdm import tqdm

    generator.to(device)
    clip.to(device)
    start_time = time.perf_counter()
    with tqdm(total=total, unit="sample", desc=f"synth{f' rank {dist.rank}' if dist.world > 1 else ''}",
              disable=not progress or total == 0) as bar, torch.no_grad():
        for k in todo:
            start, end = k * shard_size, min(samples, (k + 1) * shard_size)
            ws_all, emb_all = [], []
            for b in range(start, end, batch_size):
                z = seeded_latents([(seed, i) for i in range(b, min(end, b + batch_size))], generator.z_dim).to(device)
                ws = generator.mapping(z)
                ws_all.append(ws[:, 0].cpu())
                emb_all.append(image_embeddings(generator, clip, ws, downsample).cpu())
                bar.update(ws.shape[0])
            tensors = {"w": torch.cat(ws_all), "embedding": torch.cat(emb_all), "index": torch.arange(start, end)}
            with atomic_path(run.pairs / shard_name(k)) as tmp:
                tmp.write_bytes(safetensors_bytes(tensors, metadata={"kind": SHARD_KIND, "clip_fingerprint": identity["clip_fingerprint"],
                                                       "generator_fingerprint": identity["generator_fingerprint"],
                                                       "synth_batch": str(batch_size)}))
    elapsed = time.perf_counter() - start_time
    if progress and total:
        print(f"synth: {total} samples in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} samples/s)")

    dist.barrier()
    complete = all((run.pairs / shard_name(k)).exists() for k in range(num_shards))
    if complete and dist.main:
        shards = []
        for k in range(num_shards):
            count = min(samples, (k + 1) * shard_size) - k * shard_size
            shards.append(dict(file=shard_name(k), count=count))
        write_json(run.manifest_path, dict(kind=SHARD_KIND, samples=samples, shards=shards, **{
            key: identity[key] for key in ("clip", "clip_fingerprint", "generator", "generator_fingerprint", "seed")}))
    dist.barrier()
    return complete


def load_pairs(run: Run) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(w [N, w_dim], embedding [N, D], manifest) from a complete synth stage; clear errors for missing or bad shards."""
    if not run.manifest_path.is_file():
        raise RunError(f"{run.out} has no complete set of pairs (no {run.manifest_path.name}); run `t2f-train synth` first")
    manifest = read_run_json(run.manifest_path)
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not shards:
        raise RunError(f"{run.manifest_path} lists no shards")
    if not isinstance(shards, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                               and isinstance(e.get("count"), int) for e in shards):
        raise RunError(f"{run.manifest_path} is malformed; delete it and rerun `t2f-train synth` to remake it")
    ws, embs = [], []
    for entry in shards:
        path = run.pairs / os.path.basename(entry["file"])
        if not path.is_file():
            raise RunError(f"shard {path} is missing; delete {run.manifest_path.name} and rerun `t2f-train synth` to remake it")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                w, e = f.get_tensor("w"), f.get_tensor("embedding")
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            raise RunError(f"shard {path} is truncated or corrupt ({err}); delete it and rerun `t2f-train synth`") from None
        if meta.get("kind") != SHARD_KIND or any(meta.get(k) != manifest.get(k) for k in ("clip_fingerprint", "generator_fingerprint")):
            raise RunError(f"shard {path} does not belong to this run (another generator or CLIP)")
        if w.shape[0] != entry["count"] or e.shape[0] != entry["count"] or w.shape[0] == 0:
            raise RunError(f"shard {path} holds {w.shape[0]} pairs, the manifest says {entry['count']}")
        ws.append(w.float())
        embs.append(e.float())
    return torch.cat(ws), torch.cat(embs), manifest
