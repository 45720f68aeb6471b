"""The generator's interface, as the graphs, the backends, export and the trainer use it (a typing.Protocol).

`t2f.stylegan2.Generator` is the one implementation; a generator from elsewhere that answers these works with every
part of t2f that takes a `StyleGenerator`. Read off the call sites: `t2f.graphs` (graph modules, example inputs,
`ModelDims`), `t2f.engine.backends` (the torch backends' synthesis, the on-demand export's cache key), `t2f.export`
(cache keys, fingerprints, parity) and `t2f.trainer` (synth, fit, the report).

    mapping(z [B, z_dim], truncation_psi=1.0, truncation_cutoff=None)          -> ws [B, num_ws, w_dim]
    synthesis(ws, noise_mode, precision, noise_seeds, memory_format)           -> image [B, C, H, W] float32 in [-1, 1]
    synthesis.fold(precision)                                                  (the exported graphs' constant weights)
"""

from __future__ import annotations

from typing import Protocol

import torch

from .config import GeneratorConfig
from .precision import Precision


class StyleMapping(Protocol):
    """z -> ws, and the running average of w that truncation pulls toward."""

    w_avg: torch.Tensor         # [w_dim]

    def __call__(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None) -> torch.Tensor: ...


class StyleSynthesis(Protocol):
    """ws -> float image; `fold` turns its weight-only computations into constant buffers for one precision."""

    def __call__(self, ws: torch.Tensor, noise_mode: str = "const", precision: Precision = Precision.FP32,
                 noise_seeds: list[int] | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor: ...

    def fold(self, precision: Precision) -> None: ...


class StyleGenerator(Protocol):
    """A StyleGAN2 generator as t2f uses it: two networks, their sizes and the config they were made from. It is an
    nn.Module too (state_dict for fingerprints, to / eval / requires_grad_ in the trainer, deepcopy in the graphs)."""

    config: GeneratorConfig     # saved beside the weights; its to_dict() is part of the export's cache keys
    z_dim: int
    w_dim: int
    num_ws: int
    resolution: int             # the image's side in pixels
    img_channels: int
    mapping: StyleMapping
    synthesis: StyleSynthesis

    @property
    def w_avg(self) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...
