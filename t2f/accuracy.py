"""How close outputs are to the eager outputs they are checked against: the one set of accuracy metrics t2f reports.

t2f-export's parity table (each graph against eager PyTorch fp32), t2f-bench's accuracy columns (each row against
eager fp32 on the same inputs) and benchmarks/gpu_parity.py all call `accuracy`. numpy and float64 throughout, on
torch tensors (any device or dtype) or arrays alike.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

EPS = 1e-12             # floor of a norm in a denominator: an all-zero reference gives a finite error


def accuracy(output: Mapping, reference: Mapping, per_row: bool = False) -> dict:
    """The metrics of each quantity that both `output` and `reference` hold (a missing or None one is skipped):

        embedding    [B, D]                 embedding_cosine (the smallest over rows), embedding_relative_error
        ws           [B, num_ws, w_dim]     ws_relative_error
        float_image  [B, C, H, W]           float_image_relative_error
        image        [B, H, W, C] uint8     uint8_mean_diff, uint8_p99_diff (levels), uint8_max_diff (an int)

    A relative error is ||output - reference|| / ||reference||, over the whole batch, or (per_row) the largest of the
    rows' own (t2f-bench: one row's error does not hide in a batch).
    """
    have = [q for q in ("embedding", "ws", "float_image", "image") if output.get(q) is not None and reference.get(q) is not None]
    metrics: dict = {}
    for quantity in have:
        if quantity == "image":
            metrics.update(uint8_difference(output["image"], reference["image"]))
            continue
        a, b = _float64(output[quantity]), _float64(reference[quantity])
        metrics[f"{quantity}_relative_error"] = relative_error(a, b, per_row)
        if quantity == "embedding":
            metrics["embedding_cosine"] = min_cosine(a, b)
    return metrics


def relative_error(a: np.ndarray, b: np.ndarray, per_row: bool = False) -> float:
    if not per_row:
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), EPS))
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), EPS)).max())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between matching rows of a and b [B, D]."""
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), EPS)
    return float(cos.min())


def uint8_difference(a, b) -> dict:
    """Mean, 99th percentile and max |a - b| of two uint8 images, in levels."""
    d = np.abs(_array(a).astype(np.int16) - _array(b).astype(np.int16))
    return dict(uint8_mean_diff=float(d.mean(dtype=np.float64)), uint8_p99_diff=float(np.percentile(d, 99)),
                uint8_max_diff=int(d.max()))


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):                        # a torch tensor, wherever it lives
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _float64(x) -> np.ndarray:
    if hasattr(x, "detach"):                        # bf16 has no numpy type: through torch's float64
        import torch

        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, np.float64)
