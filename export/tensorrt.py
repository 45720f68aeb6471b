"""TensorRT engines from the exported ONNX graphs, through TensorRT's Python API (no trtexec).

Not run by us: TensorRT cannot be installed on the machines this project is developed and
tested on (PyPI's TensorRT packages download the real libraries from NVIDIA's own index).
This module is written against TensorRT 10's documented API; its tests skip where the
`tensorrt` module is missing.

pycuda and cuda-python are not needed: engines are built from bytes on the host, and the
engine's buffers and stream belong to torch at run time. Engines are checked and loaded by
`t2f.artifacts` (`load_engine`), which the runtimes use without this tool.
"""

from __future__ import annotations

from pathlib import Path

from t2f.artifacts import tensorrt_module
from t2f.graphs import ExportError
from t2f.files import atomic_path, sha256_file
from t2f.precision import Precision


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profiles: dict[str, tuple[tuple, tuple, tuple]],   # input name -> (min, opt, max) shapes
    precision: Precision,
    timing_cache: Path,
    optimization_level: int = 3,                         # TensorRT builder optimization level, 0-5.
    log=print,
) -> None:
    """Parse `onnx_path`, build with one optimization profile, write the serialized engine atomically."""
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        # The ONNX graphs carry their own precision (fp16 where it is safe, fp32 elsewhere): keep it.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if Precision.parse(precision).half and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)        # fp32 layers are true fp32 (TensorRT allows TF32 by default)
    config.builder_optimization_level = optimization_level
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"build {engine_path.name} (TensorRT {trt.__version__}, {precision})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_engines(
    out: Path,                                   # The export directory: ONNX graphs in, engines and the manifest out.
    specs: dict,                                 # Graph name -> GraphSpec (t2f.artifacts.specs_of).
    manifest,                                    # The export's Manifest, as export_artifacts left it; updated and written.
    precision: Precision,
    batch: tuple[int, int, int],                 # The TensorRT profile's (MIN, OPT, MAX) batch.
    info: dict,                                  # t2f.artifacts.runtime_info(): TensorRT version and GPU, recorded with each engine.
    timing_cache: Path,
    optimization_level: int = 3,                 # TensorRT builder optimization level, 0-5.
    log=print,
) -> None:
    """One engine per graph, rebuilt only where its record (ONNX hash, precision, profile, TensorRT, GPU) or its file changed."""

    built = manifest.tensorrt
    engines = dict(built.get("engines", {})) if built.get("gpu") == info["gpu"] else {}
    for spec in specs.values():
        onnx_name, engine = spec.file_name(precision), out / spec.file_name(precision, "plan")
        profiles = spec.profile(batch)
        record = dict(onnx=onnx_name, onnx_sha256=manifest.sha256(onnx_name), precision=str(precision),
                      opt_level=optimization_level, profiles={k: [list(s) for s in v] for k, v in profiles.items()}, **info)
        known = engines.get(engine.name, {})
        if known.get("record") == record and engine.is_file() and known.get("sha256") == sha256_file(engine):
            log(f"cached {engine.name}")
            continue
        build_engine(out / onnx_name, engine, profiles, precision, timing_cache, optimization_level, log=log)
        engines[engine.name] = dict(record=record, sha256=sha256_file(engine))
    manifest.tensorrt = dict(info, engines=engines)
    manifest.write(out)
