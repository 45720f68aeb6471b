"""What a caller passes as prompts and sampling options, checked before any model runs (one-line UsageErrors)."""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import torch

from t2f.errors import UsageError


def is_blank(prompt: str) -> bool:
    """True for a prompt with nothing but white space and invisible format characters."""
    return not "".join(c for c in prompt if not c.isspace() and unicodedata.category(c) != "Cf")


def as_prompts(prompt) -> list[str]:
    """A prompt or a list (or tuple) of prompts -> the rows; UsageError (one line) for an empty or blank one, or another type."""
    if isinstance(prompt, str):
        if is_blank(prompt):
            raise UsageError("the prompt is empty: give a non-empty string, or a list of them")
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        what = "an empty list" if isinstance(prompt, (list, tuple)) else repr(prompt) if prompt is None else type(prompt).__name__
        raise UsageError(f"prompt must be a non-empty string or a non-empty list of strings, got {what}")
    for i, p in enumerate(prompt):
        if not isinstance(p, str) or is_blank(p):
            raise UsageError(f"prompt {i} of {len(prompt)} is {'empty' if isinstance(p, str) else 'not a string'}: "
                             "every prompt must be a non-empty string")
    return list(prompt)


def check_sampling(n: int, truncation_psi: float) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"n must be an integer >= 1, got {n!r}")
    if not math.isfinite(float(truncation_psi)):
        raise UsageError(f"truncation psi must be finite, got {truncation_psi}")


def check_images(images) -> None:
    """UsageError (one line) unless `images` is a float tensor [rows, 3, H, W] with at least one row."""
    if not isinstance(images, torch.Tensor):
        raise UsageError(f'mode "image" needs images as a tensor [rows, 3, H, W] in [-1, 1], got {type(images).__name__}')
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] != 3 or not images.is_floating_point():
        raise UsageError(f'mode "image" needs images as a float tensor [rows, 3, H, W] in [-1, 1], got {images.dtype} '
                         f"{list(images.shape)}")
