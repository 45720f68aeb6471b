"""Seeded mapper latents: one numpy stream per row, the same on every device.

The pipeline keys image j of row i by (seed, i, j) (`t2f.engine.pipeline.sample_z`); t2f-train's synth keys sample i
by (seed, i) (`t2f.trainer.synth`). The key's length is part of the stream: the two never draw the same latents.
"""

from __future__ import annotations

import numpy as np
import torch


def seeded_latents(keys: list[tuple[int, ...]], z_dim: int) -> torch.Tensor:
    """Latents [len(keys), z_dim] float32 on the CPU: row r is numpy's standard normal from the generator seeded with
    keys[r] (a tuple of non-negative integers), drawn in float32."""
    z = [np.random.default_rng([int(k) for k in key]).standard_normal(z_dim, dtype=np.float32) for key in keys]
    return torch.from_numpy(np.stack(z)) if z else torch.zeros([0, z_dim])
