"""What an export directory holds and how a runtime checks and loads it: the manifest, the artifact checks, the ONNX
Runtime session and TensorRT engine loaders.

`t2f-export` (t2f.export) writes these files; the engine's backends check and load them from here, so running
artifacts never needs the export tool. `manifest.json` is read, checked and written only through `Manifest`:

    t2f               the t2f version that last wrote it
    updated           when (UTC, ISO 8601)
    models            the models' names, fingerprints and the sizes the graphs' interfaces depend on
    onnx              file name -> {graph, precision, sha256, key, parity_ok, ...}
    parity            precision -> the parity table's rows
    graph_precisions  precision -> graph -> the precision that graph runs in (bf16: a graph that failed its
                      bf16 parity bounds runs fp32)
    batch_profile     [MIN, OPT, MAX] batch of the engines built from the graphs
    tensorrt          the TensorRT runtime the engines were built with, and each engine's record

TensorRT is imported only when an engine is loaded (its Python package comes from NVIDIA's index; this module is
written against TensorRT 10's documented API and has not run against it here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch

from . import __version__
from .clip import Clip
from .files import read_json, sha256_file, write_json
from .graphs import DEFAULT_PROFILE, ExportError, ModelDims
from .io import fingerprint
from .mapper import Mapper
from .precision import Precision
from .specs import GraphSpec, graph_specs
from .types import StyleGenerator

MANIFEST = "manifest.json"
OPSET = 17                  # the ONNX opset the graphs are exported with (part of each graph's cache key)


# ----------------------------------------------------------------------------
# The manifest.


@dataclasses.dataclass
class Manifest:
    t2f: str = ""
    updated: str = ""
    models: dict = dataclasses.field(default_factory=dict)
    onnx: dict = dataclasses.field(default_factory=dict)
    parity: dict = dataclasses.field(default_factory=dict)
    graph_precisions: dict = dataclasses.field(default_factory=dict)
    batch_profile: tuple[int, int, int] = DEFAULT_PROFILE
    tensorrt: dict = dataclasses.field(default_factory=dict)

    # --- reading ------------------------------------------------------------------

    @classmethod
    def read(cls, out: Path) -> "Manifest":
        """`out`'s manifest, or ExportError saying in one line why `out` is not a t2f-export output."""
        out = Path(out)
        path = out / MANIFEST
        if not path.is_file():
            raise ExportError(f"{out} has no {MANIFEST}: it is not a t2f-export output; run t2f-export --out {out}")
        try:
            data = read_json(path)
        except (ValueError, OSError) as e:
            raise ExportError(f"{path} is unreadable or not JSON ({e}); run t2f-export --out {out} again") from None
        if not is_export_manifest(data):
            raise ExportError(f"{path} is not a t2f-export manifest; run t2f-export into another directory")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, KeyError) as e:
            raise ExportError(f"{path} is malformed ({e}); run t2f-export --out {out} again") from None

    @classmethod
    def read_or_new(cls, out: Path) -> "Manifest":
        """`out`'s manifest; a new one if there is none or it is unreadable (an export then starts afresh)."""
        try:
            return cls.read(out)
        except ExportError:
            return cls()

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        profile = data.get("batch_profile") or DEFAULT_PROFILE
        profile = tuple(int(b) for b in profile)
        if len(profile) != 3 or not 1 <= profile[0] <= profile[1] <= profile[2] <= 4096:
            raise ValueError(f"batch_profile {list(profile)} is not 1 <= MIN <= OPT <= MAX <= 4096")
        fields = {f.name for f in dataclasses.fields(cls)} - {"batch_profile"}
        values = {k: data[k] for k in fields if k in data}
        for k, v in values.items():
            if not isinstance(v, str if k in ("t2f", "updated") else dict):
                raise TypeError(f"{k} is a {type(v).__name__}")
        return cls(batch_profile=profile, **values)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["batch_profile"] = list(self.batch_profile)
        return data

    def write(self, out: Path) -> None:
        write_json(Path(out) / MANIFEST, self.to_dict())

    # --- what it says ---------------------------------------------------------------

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_manifest(self.models)

    def sha256(self, file_name: str) -> str | None:
        return (self.onnx.get(file_name) or {}).get("sha256")

    def graph_precision(self, graph: str, precision) -> str:
        """The precision `graph` runs in for a run in `precision` (bf16 graphs that failed parity run fp32)."""
        return (self.graph_precisions.get(str(precision)) or {}).get(graph, str(precision))


def is_export_manifest(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("onnx"), dict) and "t2f" in data


def is_export_manifest_file(path: Path) -> bool:
    """True for a regular file holding a t2f-export manifest (a FIFO or a device there is never opened)."""
    try:
        return is_export_manifest(read_json(path))
    except (ValueError, OSError):
        return False


# ----------------------------------------------------------------------------
# What an export directory holds: the graphs, engines, their record, and temporaries of a killed export.

EXPORT_NAMES = re.compile(r"(text_encoder|mapper|synthesis)(\.fp16)?\.(onnx|plan)|parity\.md|manifest\.json|timing\.cache"
                          r"|\.t2f\.lock|\.parity-.*|\..+\.(tmp|old)")


def foreign_files(out: Path) -> list[str]:
    """Files in `out` that t2f-export did not make (a manifest.json that is not an export's counts as one)."""
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not EXPORT_NAMES.fullmatch(n)]
    if MANIFEST in names and not is_export_manifest_file(out / MANIFEST):
        foreign.append(MANIFEST)                           # a FIFO there is never opened
    return foreign


def temporaries(out: Path) -> list[Path]:
    """What an export that did not finish leaves in `out`: .parity-* scratch directories, .*.tmp and .*.old files."""
    found = out.iterdir() if out.is_dir() else ()
    return [p for p in found if p.name.startswith(".parity-") or (p.name.startswith(".") and p.name.endswith((".tmp", ".old")))]


def remove_stale_temporaries(out: Path) -> list[str]:
    """Remove what a killed export left in `out` (see temporaries); call with its lock held. The names removed."""
    for p in (found := temporaries(out)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [p.name for p in found]


# ----------------------------------------------------------------------------
# Which graphs belong to which models: the specs and the cache keys that the export records and every runtime checks.


def specs_of(generator: StyleGenerator, clip: Clip, mapper: Mapper) -> dict[str, GraphSpec]:
    return graph_specs(ModelDims.of(generator, clip, mapper))


def graph_keys(generator: StyleGenerator, clip: Clip, mapper: Mapper, precision: Precision) -> dict[str, str]:
    """Cache keys of the three graphs: weights, configs, precision, opset and versions."""
    precision = Precision.parse(precision)
    versions = f"t2f {__version__} torch {torch.__version__} opset {OPSET}"
    gcfg = json.dumps(generator.config.to_dict(), sort_keys=True)
    mcfg = json.dumps(mapper.config.to_dict(), sort_keys=True)
    return {
        "text_encoder": f"{clip.name} {clip.fingerprint} {precision} {versions}",
        "mapper": f"{fingerprint(mapper)} {mcfg} w_avg {fingerprint(generator.mapping)} fp32 {versions}",
        "synthesis": f"{fingerprint(generator)} {gcfg} {precision} uint8 folded {versions}",
    }


def check_artifacts(out: Path, generator: StyleGenerator, clip: Clip, mapper: Mapper, precision: Precision,
                    error: type[Exception] = ExportError) -> Manifest:
    """The manifest of `out` if it holds all three graphs of exactly these models for `precision`, each unchanged since
    export and checked in that precision; `error` (ExportError by default) saying in one line what differs otherwise."""
    try:
        return _check_artifacts(Path(out), generator, clip, mapper, Precision.parse(precision))
    except ExportError as e:
        if error is ExportError:
            raise
        raise error(str(e)) from None


def _check_artifacts(out: Path, generator, clip, mapper, precision: Precision) -> Manifest:
    manifest = Manifest.read(out)
    specs = specs_of(generator, clip, mapper)
    flag = {Precision.FP16: " --fp16", Precision.BF16: " --precision bf16"}.get(precision, "")
    for graph, key in graph_keys(generator, clip, mapper, precision.onnx).items():
        name = specs[graph].file_name(precision.onnx)
        entry = manifest.onnx.get(name)
        if not entry:
            raise ExportError(f"{out} has no {name}; run t2f-export{flag} --out {out}")
        if entry.get("key") != key:
            raise ExportError(f"{out / name} was exported from other models or versions; run t2f-export again for these")
        if not (out / name).is_file() or sha256_file(out / name) != entry.get("sha256"):
            raise ExportError(f"{out / name} does not match its manifest (missing, corrupt or changed); run t2f-export again")
        if not entry.get("parity_ok"):
            raise ExportError(f"{out / name} failed its parity check; see {out / 'parity.md'}")
        if precision.value not in entry.get("checked", [precision.onnx.value]):
            raise ExportError(f"{out / name} has no {precision} parity check yet; run t2f-export{flag} --out {out}")
    if manifest.dims != ModelDims.of(generator, clip, mapper):
        raise ExportError(f"{out / MANIFEST} records other model sizes; run t2f-export again")
    return manifest


def artifacts_current(out: Path, generator: StyleGenerator, clip: Clip, mapper: Mapper, precision: Precision) -> bool:
    try:
        check_artifacts(out, generator, clip, mapper, precision)
        return True
    except ExportError:
        return False


# ----------------------------------------------------------------------------
# Loading: an ONNX Runtime session, a TensorRT engine.


def onnx_session(path: str | os.PathLike, expected_sha256: str | None = None):
    """An ONNX Runtime CPU session for an exported graph, refusing a file whose checksum is not the manifest's."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} is missing; run t2f-export again")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise ExportError(f"{path} does not match its manifest (corrupt or changed); run t2f-export again to rebuild it")
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for invalid models
        raise ExportError(f"{path} cannot be loaded by ONNX Runtime ({type(e).__name__}); run t2f-export again") from None


def tensorrt_module():
    try:
        import tensorrt
    except ImportError:
        raise ExportError("TensorRT is not installed (its Python package comes from NVIDIA's index); "
                          "install it, or pass --onnx-only") from None
    return tensorrt


def runtime_info(device=None) -> dict:
    """TensorRT version and the GPU `device` (default: the current CUDA device) builds and runs engines on."""
    trt = tensorrt_module()
    if not torch.cuda.is_available():
        raise ExportError("building TensorRT engines needs a CUDA GPU; pass --onnx-only on this machine")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    return dict(tensorrt=trt.__version__, gpu=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}")


def check_compatible(manifest: Manifest, runtime: dict) -> None:
    """Refuse engines built with another TensorRT version or for another GPU (the manifest's record), saying to re-export."""
    built = manifest.tensorrt
    for key, what in (("tensorrt", "TensorRT version"), ("gpu", "GPU"), ("compute_capability", "compute capability")):
        if built.get(key) != runtime.get(key):
            raise ExportError(f"the engines were built for {what} {built.get(key)!r}, this machine has {runtime.get(key)!r}; "
                              f"run t2f-export again on this machine to rebuild them")


def load_engine(path: str | os.PathLike, manifest: Manifest, device=None):
    """Deserialize an engine on `device` (default: the current one) after checking it was built for this TensorRT and GPU."""
    trt = tensorrt_module()
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    check_compatible(manifest, runtime_info(device))
    with torch.cuda.device(device):                    # an engine belongs to the device current when it is deserialized
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise ExportError(f"{path} is not a valid engine for this TensorRT; run t2f-export again")
    return engine
