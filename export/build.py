"""t2f-export's work as one library call: the models loaded, the ONNX graphs exported and checked, the engines built.

`export_models` is what `t2f-export` calls after its usage checks (export/cli.py), and what a
notebook calls: ONNX through export/onnx_export.py, TensorRT through export/tensorrt.py, one
process at a time per output directory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from t2f.precision import Precision
from t2f.sources import ModelSources

PARITY_MAX_BATCH = 3


def parity_batches(batch: tuple[int, int, int]) -> list[int]:
    """The batch sizes parity is checked at: the profile's smallest, and its largest up to PARITY_MAX_BATCH.

    Beyond a few images a larger batch checks nothing new on the CPU (the graphs do not mix images),
    and at 1024 px each image costs seconds in eager PyTorch and again in ONNX Runtime.
    """
    return sorted({batch[0], max(batch[0], min(batch[2], PARITY_MAX_BATCH))})


def export_models(
    out: Path,                                   # Output directory (checked by the caller: a t2f-export output or new).
    models: ModelSources,                        # The mapper (run directory, hf-hub:ORG/NAME, or tiny) and, where given, the
                                                 # generator and CLIP (None = the ones the mapper was trained for), the cache.
    precision: Precision,                        # FP32, FP16 (graphs and engines for CUDA) or BF16 (ONNX only).
    batch: tuple[int, int, int],                 # TensorRT profile (MIN, OPT, MAX); parity at MIN and MAX up to 3.
    onnx_only: bool = False,                     # Stop after the ONNX graphs (no TensorRT).
    optimization_level: int = 3,                 # TensorRT builder optimization level, 0-5.
    timing_cache: Path | None = None,            # TensorRT timing cache; None = OUT/timing.cache.
    log=print,                                   # One line of progress; the parity table goes through it too.
):
    """Export (or reuse) the three graphs, check their parity and, unless onnx_only, build their TensorRT engines.

    Returns (manifest, specs). Raises ExportError, WeightsError and the loaders' errors; TensorRT
    and a GPU, and a bf16 parity this CPU cannot measure, are checked before any work.
    """
    from t2f.artifacts import remove_stale_temporaries, runtime_info, specs_of
    from t2f.graphs import text_tower
    from t2f.private import directory_lock
    from t2f.sources import load_models

    from .onnx_export import check_parity_precision, export_artifacts, format_table
    from .tensorrt import build_engines

    with contextlib.ExitStack() as held:
        info = None if onnx_only else runtime_info()       # fail before any work when TensorRT or a GPU is missing
        check_parity_precision(precision)                   # and when this CPU cannot run bf16 (t2f-export falls back to fp32)
        G, C, M, resolved = load_models(models)
        text_tower(C)                                       # a text tower the rewrite cannot express: refused before any work
        held.enter_context(directory_lock(out, "t2f-export"))
        stale = remove_stale_temporaries(out)
        if stale:
            log(f"removed {len(stale)} temporary file(s) of an earlier export that did not finish")
        manifest, rows = export_artifacts(out, G, C, M, precision, parity_batches(batch),
                                          dict(generator=resolved.generator, mapper=resolved.label), log=log, profile=batch)
        log(format_table(rows))
        specs = specs_of(G, C, M)
        if not onnx_only:
            build_engines(out, specs, manifest, precision, batch, info, timing_cache or out / "timing.cache", optimization_level, log=log)
    return manifest, specs
