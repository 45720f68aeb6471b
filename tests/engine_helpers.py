"""Builds the tiny random-weight pipeline used by the engine and CLI tests."""

from t2f.engine import load_pipeline


def tiny_pipeline(device="cpu", precision="fp32", batch_size=8):
    return load_pipeline(generator="tiny", clip="tiny", mapper="tiny", device=device, precision=precision, batch_size=batch_size)
