"""Fixtures and hooks only (what tests share besides them is in helpers.py): tiny random-weight models, offline, the CLI runner."""

from __future__ import annotations

import os

import pytest
import torch

# Before huggingface_hub is imported (it reads this once): no test waits on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["T2F_OFFLINE"] = "1"

from helpers import invoke, tiny_pipeline  # noqa: E402
from t2f.presets import random_generator  # noqa: E402
from t2f.stylegan2 import Generator  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip, with the reason, where there is no CUDA GPU (benchmarks/gpu_check.sh runs them: -m gpu)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch finds none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_generator() -> Generator:
    return random_generator("tiny")


@pytest.fixture(scope="session")
def tiny_clip():
    from t2f.clip import load_clip

    return load_clip("tiny")


@pytest.fixture(scope="module")
def pipe():
    """The tiny random-weight pipeline on the CPU in fp32 (one per test module)."""
    return tiny_pipeline()


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No test touches the network or the user's cache."""
    monkeypatch.setenv("T2F_OFFLINE", "1")
    monkeypatch.setenv("T2F_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host or open a connection fails, and is recorded in the list returned (assert it stays empty)."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("a test tried to reach the network")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    return attempts


@pytest.fixture
def run_cli(monkeypatch):
    """`run_cli(main, args, cwd, expect=None)`: `helpers.invoke` from directory `cwd` (monkeypatch.chdir: undone after the test)."""
    def run(main, args, cwd, expect=None):
        monkeypatch.chdir(cwd)
        return invoke(main, args, expect)

    return run
