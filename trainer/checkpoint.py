"""The fit stage's state on disk: checkpoint.pt (mapper, EMA, optimizer, step) and the stats lines up to it.

A resumed fit starts from the checkpoint's step and keeps the stats lines (and grids) up to that
step only, so it continues exactly where a straight run would be.
"""

from __future__ import annotations

import io
import json
import pickle

import torch
from torch import nn

from t2f.files import atomic_path

from .run import Dist, Run, RunError


def check_finite_weights(module: nn.Module, what: str, step: int) -> None:
    bad = [name for name, p in module.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise RunError(f"fit step {step}: the {what} weights are not finite ({', '.join(bad[:3])}); nothing was written "
                       "from this step; resume from the last checkpoint with a lower --lr")


def load_checkpoint(run: Run, mapper: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the run's checkpoint into mapper, EMA and optimizer; returns its step (0 without a checkpoint)."""
    if not run.checkpoint_path.is_file():
        return 0
    try:
        ckpt = torch.load(run.checkpoint_path, map_location="cpu", weights_only=True)
        mapper.load_state_dict(ckpt["mapper"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return int(ckpt["step"])
    except (RuntimeError, KeyError, EOFError, ValueError, TypeError, AttributeError, IndexError, pickle.UnpicklingError) as e:
        raise RunError(f"{run.checkpoint_path} is corrupt or from another fit ({type(e).__name__}); delete it to start over") from None


def save_checkpoint(run: Run, step: int, mapper: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> None:
    """Write checkpoint.pt atomically (rank 0), after checking every weight is finite; all processes wait for it."""
    check_finite_weights(mapper, "mapper", step)
    check_finite_weights(ema, "EMA", step)
    if dist.main:
        buffer = io.BytesIO()             # serialized in memory: a failed write is an OSError, not torch's RuntimeError
        torch.save(dict(step=step, mapper=mapper.state_dict(), ema=ema.state_dict(),
                        optimizer=optimizer.state_dict()), buffer)
        with atomic_path(run.checkpoint_path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    dist.barrier()


def _read_stats(run: Run, upto: int) -> list[str]:
    """The stats lines up to step `upto`; a line torn by a crash (not JSON) ends the kept part."""
    if not run.stats_path.is_file():
        return []
    kept = []
    for line in run.stats_path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        if step <= upto:
            kept.append(line)
    return kept


def truncate_stats(run: Run, upto: int) -> None:
    """Rewrite stats.jsonl with its lines up to step `upto` (none for a new fit)."""
    lines = _read_stats(run, upto)
    with atomic_path(run.stats_path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def append_stats(run: Run, entry: dict) -> None:
    with open(run.stats_path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
