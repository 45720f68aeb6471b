"""t2f.engine.serve: `t2f-serve`, the pipeline on NVIDIA Triton Inference Server behind t2f's own checking HTTP front.

The data flow of one request:

    client --HTTP (KServe v2), page WebSocket--> front (web.py: routes; kserve.py: body checks; page.py)
           --gRPC on a Unix socket in the 0700 workspace--> tritonserver (tritonserver.py), dynamic batching
           --> Python backend: model.py (triton_model.py, one process per instance) --> t2f.engine pipeline
           --> image and ws back the same way

The modules:

    cli.py            t2f-serve's command: options, usage checks, then the start, supervision and stop below
    protocol.py       the one table of models, inputs, outputs and limits (numpy only): front, model.py and docs
    web.py            the front: a Starlette app on its own thread (Front), checking before forwarding
    kserve.py         KServe v2 HTTP bodies <-> tensors, each check one refusal line; Forwarder: gRPC to Triton
    connections.py    the front's limits below the app: heads, idle and slow connections, their number
    page.py           the page's WebSocket frames (static/index.html is the page)
    repository.py     the static Triton model repository: config.pbtxt and model.py per model
    triton_model.py   the repository's model.py: parse a batch (protocol.py), run the pipeline, answer each request
    tritonserver.py   tritonserver as a child process: binaries, private workspace, start, readiness, stop
    triton_files.py   what Triton leaves outside its workspace: shared memory, /tmp/python_env_*
    supervise.py      restarts of a Triton that died, within a budget per window

docs/serving.md describes the whole. Other packages use only the names below (imported on first use, so
that importing the package loads neither the front's libraries nor the command's); tests may import the
modules they test.
"""

from __future__ import annotations

import importlib

_EXPORTS = {   # name -> the module of this package that defines it
    "main": "cli",
    "ModelOptions": "repository", "write_repository": "repository",
    "TEXT_MODEL": "protocol", "IMAGE_MODEL": "protocol", "MODELS": "protocol", "INPUTS": "protocol", "OUTPUTS": "protocol",
    "MAX_BATCH": "protocol", "BadRequest": "protocol",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
