"""ONNX graphs exported on demand into the cache, for the exported-graph backends made without artifacts.

The one module of the engine that runs the export tool (`t2f.export.onnx_export.export_artifacts`, imported when an
export is needed): checking and loading artifacts is the core's (`t2f.artifacts`).
"""

from __future__ import annotations

from pathlib import Path

from t2f.artifacts import artifacts_current, remove_stale_temporaries, temporaries
from t2f.graphs import ExportError
from t2f.precision import Precision

from .types import BackendUnavailable, Models


def onnx_cache_dir(models: Models) -> Path:
    import hashlib
    import json

    from t2f.download import cache_dir
    from t2f.io import fingerprint

    generator, clip, mapper = models
    configs = hashlib.sha256(json.dumps([generator.config.to_dict(), mapper.config.to_dict()], sort_keys=True).encode())
    return cache_dir() / "onnx" / f"{fingerprint(generator)}-{clip.fingerprint}-{fingerprint(mapper)}-{configs.hexdigest()[:8]}"


def ensure_onnx(models: Models, precision: Precision) -> Path:
    """A directory in the cache with current ONNX graphs of these models for `precision`, exported (and parity-checked
    in `precision`) once.

    The cache folder is checked first (t2f.private.private_dir: 0700, no other user can change it), so no graph is
    read from a folder another user could have written. An export there holds the folder's lock, waiting for
    another process's export up to T2F_LOCK_TIMEOUT, and first removes what a killed export left.
    """
    from t2f.download import cache_dir
    from t2f.export.onnx_export import export_artifacts            # the export tool itself: the one use of it here
    from t2f.private import directory_lock, private_dir

    out = onnx_cache_dir(models)
    private_dir(cache_dir(), "onnx", out.name)
    if artifacts_current(out, *models, precision) and not temporaries(out):
        return out
    try:
        with directory_lock(out, "t2f (ONNX export into the cache)", wait=True):   # another process exporting: wait
            remove_stale_temporaries(out)
            if not artifacts_current(out, *models, precision):
                export_artifacts(out, *models, precision, [1, 2], dict(generator="in-memory", mapper="in-memory"),
                                 log=lambda *_: None)
    except ExportError as e:
        raise BackendUnavailable(f"cannot export the ONNX graphs: {e}") from None
    return out
