"""The tiny random-weight models for the engine and CLI tests: the pipeline, and the command-line options."""

from t2f.engine import load_pipeline
from t2f.presets import TINY as _TINY

TINY = ["--generator", _TINY, "--clip", _TINY, "--mapper", _TINY]      # every command's options for the tiny models


def tiny_pipeline(device="cpu", precision="fp32", batch_size=8):
    return load_pipeline(generator="tiny", clip="tiny", mapper="tiny", device=device, precision=precision, batch_size=batch_size)
