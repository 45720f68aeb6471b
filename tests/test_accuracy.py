"""t2f.accuracy: the one set of accuracy metrics (export parity, t2f-bench, the GPU parity script), and t2f.latents."""

import numpy as np
import pytest
import torch

from t2f.accuracy import accuracy
from t2f.latents import seeded_latents


def test_metrics_by_hand():
    ref = {"embedding": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "ws": torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]]),
           "float_image": np.ones([2, 3, 2, 2], np.float32), "image": torch.tensor([[0, 10, 255]], dtype=torch.uint8)}
    out = {"embedding": torch.tensor([[1.0, 1.0], [0.0, 2.0]]), "ws": torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]]),
           "float_image": np.full([2, 3, 2, 2], 1.5, np.float32), "image": torch.tensor([[2, 10, 250]], dtype=torch.uint8)}
    whole, rows = accuracy(out, ref), accuracy(out, ref, per_row=True)
    assert whole["embedding_cosine"] == pytest.approx(2 ** -0.5) and whole["embedding_relative_error"] == pytest.approx(1 / 5 ** 0.5)
    assert whole["ws_relative_error"] == pytest.approx(1 / 26 ** 0.5) and rows["ws_relative_error"] == pytest.approx(1.0)
    assert whole["float_image_relative_error"] == pytest.approx(0.5)
    assert (whole["uint8_mean_diff"], whole["uint8_max_diff"]) == (pytest.approx(7 / 3), 5) and isinstance(whole["uint8_max_diff"], int)
    assert whole["uint8_p99_diff"] == pytest.approx(np.percentile([2, 0, 5], 99))          # uint8 differences do not wrap


def test_only_what_both_hold_and_any_dtype():
    ws = torch.randn(3, 4, 8)
    assert accuracy({"ws": ws, "embedding": None}, {"ws": ws, "embedding": torch.ones(3, 2)}) == {"ws_relative_error": 0.0}
    half = accuracy({"embedding": torch.ones(2, 4, dtype=torch.bfloat16)}, {"embedding": np.ones([2, 4])})
    assert half == {"embedding_relative_error": 0.0, "embedding_cosine": pytest.approx(1.0)}
    assert accuracy({"ws": torch.zeros(1, 2)}, {"ws": torch.zeros(1, 2)}) == {"ws_relative_error": 0.0}    # no 0 / 0


def test_seeded_latents_are_one_stream_per_key():
    z = seeded_latents([(0, 1, 2), (0, 1, 3), (0, 1)], 16)
    assert z.shape == (3, 16) and z.dtype == torch.float32
    assert torch.equal(z[0], seeded_latents([(0, 1, 2)], 16)[0])                            # alone or beside others
    assert torch.equal(z[2], torch.from_numpy(np.random.default_rng([0, 1]).standard_normal(16, dtype=np.float32)))
    assert len({tuple(row.tolist()) for row in z}) == 3 and seeded_latents([], 16).shape == (0, 16)
