"""`manifest.json`: the one record of what an export directory holds. Read, checked and written only here.

    t2f               the t2f version that last wrote it
    updated           when (UTC, ISO 8601)
    models            the models' names, fingerprints and the sizes the graphs' interfaces depend on
    onnx              file name -> {graph, precision, sha256, key, parity_ok, ...}
    parity            precision -> the parity table's rows
    graph_precisions  precision -> graph -> the precision that graph runs in (bf16: a graph that failed its
                      bf16 parity bounds runs fp32)
    batch_profile     [MIN, OPT, MAX] batch of the engines built from the graphs
    tensorrt          the TensorRT runtime the engines were built with, and each engine's record
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from t2f.graphs import DEFAULT_PROFILE, ExportError, ModelDims
from t2f.files import read_json, write_json

MANIFEST = "manifest.json"


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


def dumps(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
