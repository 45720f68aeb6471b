"""A training run's directory, the options it was started with, and torchrun process info.

Layout of `--out`:
    options.json          resolved options, one section per stage (synth, fit, bank)
    pairs/                shard-NNNNN.safetensors (w, embedding, index) and manifest.json
    checkpoint.pt         the fit stage's latest checkpoint
    stats.jsonl           fit losses and held-out metrics
    config.json           } the trained mapper (EMA weights): what `t2f-infer --mapper RUN` loads
    model.safetensors     }
    bank.safetensors      CLIP image embeddings for `t2f-infer --mode knn`
    README.md             the model card (trainer/card.py), rewritten when a stage finishes
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from t2f.devices import resolve_device
from t2f.errors import T2FError
from t2f.files import read_json_as, write_json
from t2f.private import LOCK_NAME


RUN_KIND = "t2f-train-run"


class RunError(T2FError):
    """A run directory that cannot be used as asked: another run, a missing stage, bad data."""


# ----------------------------------------------------------------------------
# torchrun.


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_dist(device: str) -> tuple[Dist, torch.device]:
    """Process info from torchrun's environment (one process without it), and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda" and world > 1:
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), resolved


# ----------------------------------------------------------------------------
# The run directory.


def read_run_json(path: Path):
    """A JSON file of a run (read bounded, as t2f.files.read_json reads); RunError (one line) where it is malformed or
    cannot be read."""
    return read_json_as(path, RunError)


class Run:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.options_path = self.out / "options.json"
        self.pairs = self.out / "pairs"
        self.manifest_path = self.pairs / "manifest.json"
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.stats_path = self.out / "stats.jsonl"
        self.bank_path = self.out / "bank.safetensors"

    def options(self) -> dict:
        """options.json: {"kind": RUN_KIND, stage: {"identity": {...}, ...}}; {} for a new run."""
        if not self.options_path.exists():
            return {}
        options = read_run_json(self.options_path)
        if not isinstance(options, dict) or options.get("kind") != RUN_KIND:
            raise RunError(f"{self.out} holds an options.json that is not a t2f-train run's; choose another --out")
        for stage, section in options.items():
            if stage != "kind" and not (isinstance(section, dict) and isinstance(section.get("identity"), dict)):
                raise RunError(f"{self.options_path}: the {stage} section is malformed")
        return options

    def check_usable(self) -> None:
        """Refuse a path that is a file, or a non-empty directory that is not a t2f-train run."""
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"{self.out} is a file, not a run directory")
        if self.out.is_dir() and not self.options_path.exists():
            if any(not (p.name.startswith(".") and p.name.endswith(".tmp")) and p.name != LOCK_NAME for p in self.out.iterdir()):
                raise RunError(f"{self.out} is not empty and holds no t2f-train run; choose another --out")
        self.options()

    def claim(self, stage: str, identity: dict, extra: dict | None = None, write: bool = True, replaceable: bool = False) -> None:
        """Record this stage's options; refuse if the directory holds the stage with other identity-defining options.

        replaceable: the stage has produced nothing yet, so other options may replace the recorded ones.
        """
        self.check_usable()
        options = self.options()
        previous = (options.get(stage) or {}).get("identity")
        if previous is not None and not replaceable:
            for key, value in identity.items():
                if previous.get(key) != value:
                    raise RunError(f"{self.out} holds a different run: {stage} {key} was {previous.get(key)!r}, "
                                   f"now {value!r}; choose another --out")
        if write:
            options.update(kind=RUN_KIND)
            options[stage] = dict(identity=identity, **(extra or {}))
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.options_path, options)

    def fit_started(self) -> bool:
        """Whether fit has written anything that depends on its options (a checkpoint or the model); until then
        the fit options recorded in options.json may change, whichever command changes them."""
        return self.checkpoint_path.exists() or (self.out / "model.safetensors").exists()

    def stage(self, stage: str, hint: str) -> dict:
        section = self.options().get(stage)
        if section is None:
            raise RunError(f"{self.out} has no {stage} stage yet; {hint}")
        return section

    def clean_stale_temporaries(self) -> None:
        """Remove temporary files left by a killed run (atomic writes never leave anything else)."""
        for folder in (self.out, self.pairs):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
