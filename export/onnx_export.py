"""ONNX export of the three graphs, with a cache, checks, and a parity table against eager PyTorch.

Each graph is traced with the TorchScript exporter (opset 17, dynamic batch), checked with
`onnx.checker`, written to a temporary file and renamed. A graph whose cache key (weights
fingerprint, precision, opset, torch and t2f versions) and file checksum match the manifest is
not exported again.

Parity: every graph runs in ONNX Runtime (CPU) on fresh random valid inputs and is compared
with eager PyTorch fp32; relative error ||onnx - eager|| / ||eager||. The synthesis graph is
compared before its uint8 conversion (a float twin of the same graph, traced the same way),
and its uint8 artifact must be within one level of eager's uint8 image.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import t2f
from t2f.clip import Clip
from t2f.io import atomic_path, fingerprint
from t2f.mapper import Mapper
from t2f.stylegan2 import Generator, to_uint8

from t2f.graphs import ExportError, MapperGraph, SynthesisGraph, TextEncoderGraph

OPSET = 17
GRAPHS = ("text_encoder", "mapper", "synthesis")
BOUNDS = {"fp32": 1e-4, "fp16": 2e-2}
MANIFEST = "manifest.json"


@dataclasses.dataclass
class Export:
    """One graph to export: the module, example inputs, input/output names, and its cache key."""
    name: str
    module: torch.nn.Module
    inputs: tuple
    input_names: list[str]
    output_names: list[str]
    key: str


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}


# ----------------------------------------------------------------------------
# Inputs.


def example_tokens(clip: Clip, batch: int, seed: int) -> torch.Tensor:
    """Valid token rows of random lengths: [start, random ids..., end, 0 ...] int32."""
    g = torch.Generator().manual_seed(seed)
    ctx = clip.context_length
    sot, eot = clip.tokenize([""])[0, :2].tolist()
    tokens = torch.zeros([batch, ctx], dtype=torch.int32)
    for i in range(batch):
        n = int(torch.randint(1, ctx - 1, [1], generator=g))
        tokens[i, 0] = sot
        tokens[i, 1 : n + 1] = torch.randint(1, min(eot, 49406) - 1, [n], generator=g)
        tokens[i, n + 1] = eot
    return tokens


def example_inputs(name: str, batch: int, seed: int, clip: Clip, mapper: Mapper, generator: Generator) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if name == "text_encoder":
        return (example_tokens(clip, batch, seed),)
    if name == "mapper":
        embedding = torch.nn.functional.normalize(torch.randn([batch, mapper.config.embed_dim], generator=g), dim=-1)
        return (embedding, torch.randn([batch, mapper.z_dim], generator=g), 0.5 + 0.5 * torch.rand([batch], generator=g))
    z = torch.randn([batch, generator.z_dim], generator=g)
    return (generator.mapping(z.to(generator.w_avg.device), truncation_psi=0.7).detach().cpu(),)


# ----------------------------------------------------------------------------
# Export.


def graph_keys(generator: Generator, clip: Clip, mapper: Mapper, fp16: bool) -> dict[str, str]:
    """Cache keys of the three graphs: weights, configs, precision, opset and versions."""
    precision = "fp16" if fp16 else "fp32"
    versions = f"t2f {t2f.__version__} torch {torch.__version__} opset {OPSET}"
    gcfg = json.dumps(generator.config.to_dict(), sort_keys=True)
    mcfg = json.dumps(mapper.config.to_dict(), sort_keys=True)
    return {
        "text_encoder": f"{clip.name} {clip.fingerprint} {precision} {versions}",
        "mapper": f"{fingerprint(mapper)} {mcfg} w_avg {fingerprint(generator.mapping)} fp32 {versions}",
        "synthesis": f"{fingerprint(generator)} {gcfg} {precision} uint8 {versions}",
    }


def on_cpu(generator: Generator, clip: Clip, mapper: Mapper):
    """The models on the CPU, copied if they live elsewhere: export and parity run there."""
    if all(next(m.parameters()).device.type == "cpu" for m in (generator, clip.model, mapper)):
        return generator, clip, mapper
    return copy.deepcopy(generator).cpu(), copy.deepcopy(clip).to("cpu"), copy.deepcopy(mapper).cpu()


def plan(generator: Generator, clip: Clip, mapper: Mapper, fp16: bool) -> list[Export]:
    """The three exports with their cache keys (models on the CPU)."""
    keys = graph_keys(generator, clip, mapper, fp16)
    modules = {
        "text_encoder": TextEncoderGraph(clip.model, half=fp16),
        "mapper": MapperGraph(mapper, generator.w_avg),
        "synthesis": SynthesisGraph(generator, half=fp16),
    }
    names = {
        "text_encoder": (["tokens"], ["embedding"]),
        "mapper": (["embedding", "z", "psi"], ["ws"]),
        "synthesis": (["ws"], ["image"]),
    }
    return [Export(n, modules[n], example_inputs(n, 2, 0, clip, mapper, generator), *names[n], keys[n]) for n in GRAPHS]


def export_onnx(module: torch.nn.Module, inputs: tuple, input_names: list[str], output_names: list[str], path: Path) -> None:
    """Trace `module` to ONNX at `path` (atomically), with a dynamic batch on every input and output, and check it."""
    import onnx

    axes = {name: {0: "batch"} for name in input_names + output_names}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, inputs, str(tmp), input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(str(tmp))


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


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def parity(export: Export, path: Path, precision: str, batches: list[int], clip: Clip, mapper: Mapper,
           generator: Generator, sha: str, workdir: Path) -> list[dict]:
    """Rows of the parity table for one exported graph."""
    session = onnx_session(path, sha)
    float_twin = None
    if export.name == "synthesis":
        twin = SynthesisGraph(generator, half=precision == "fp16", uint8=False)
        float_twin = workdir / "synthesis-float.onnx"
        export_onnx(twin, export.inputs, export.input_names, ["image"], float_twin)
        float_twin = onnx_session(float_twin)
    rows = []
    for batch in batches:
        inputs = example_inputs(export.name, batch, 1000 + batch, clip, mapper, generator)
        feeds = {n: t.numpy() for n, t in zip(export.input_names, inputs)}
        with torch.no_grad():
            if export.name == "text_encoder":
                reference = clip.text_encoder(inputs[0].long()).numpy()
            elif export.name == "mapper":
                reference = MapperGraph(mapper, generator.w_avg)(*inputs).numpy()
            else:
                reference = generator.synthesis(inputs[0], noise_mode="const")
        row = dict(graph=export.name, precision=precision, batch=batch, bound=BOUNDS[precision])
        if float_twin is not None:
            out = float_twin.run(None, feeds)[0]
            row["relative_error"] = relative_error(out, reference.numpy())
            image = session.run(None, feeds)[0]
            row["uint8_max_diff"] = int(np.abs(image.astype(np.int32) - to_uint8(reference).numpy().astype(np.int32)).max())
            row["ok"] = row["relative_error"] <= row["bound"] and (precision == "fp16" or row["uint8_max_diff"] <= 1)
        else:
            out = session.run(None, feeds)[0]
            row["relative_error"] = relative_error(out, reference)
            row["ok"] = row["relative_error"] <= row["bound"]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| graph | precision | batch | relative error | bound | uint8 max diff | ok |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['precision']} | {r['batch']} | {r['relative_error']:.2e} | {r['bound']:.0e} | "
                     f"{r.get('uint8_max_diff', '')} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def run_onnx_exports(out: Path, generator: Generator, clip: Clip, mapper: Mapper, fp16: bool, batches: list[int],
                     log=print) -> tuple[dict, list[dict]]:
    """Export (or reuse) the three graphs into `out`; returns ({file: entry}, parity rows).

    Parity is checked again only for graphs that were exported now, or that lack a passed check.
    """
    generator, clip, mapper = on_cpu(generator, clip, mapper)
    exports = plan(generator, clip, mapper, fp16)                   # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    precision = "fp16" if fp16 else "fp32"
    suffix = "" if precision == "fp32" else ".fp16"
    manifest = read_manifest(out)
    previous, previous_rows = manifest.get("onnx", {}), (manifest.get("parity") or {}).get(precision, [])
    graphs, rows = {}, []
    scratch = Path(tempfile.mkdtemp(prefix=".parity-", dir=out))   # private: concurrent exports do not collide
    try:
        for export in exports:
            path = out / f"{export.name}{suffix}.onnx"
            entry = previous.get(path.name)
            cached = bool(entry and entry.get("key") == export.key and path.is_file() and sha256_file(path) == entry.get("sha256"))
            if cached:
                log(f"cached {path.name}")
            else:
                log(f"export {path.name}")
                try:
                    export_onnx(export.module, export.inputs, export.input_names, export.output_names, path)
                except (RuntimeError, ValueError, TypeError) as e:
                    raise ExportError(f"cannot export {path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            sha = sha256_file(path)
            old_rows = [r for r in previous_rows if r["graph"] == export.name and r["batch"] in batches]
            if cached and entry.get("parity_ok") and len(old_rows) == len(batches):
                graph_rows = old_rows
            else:
                graph_rows = parity(export, path, precision, batches, clip, mapper, generator, sha, scratch)
            rows += graph_rows
            graphs[path.name] = dict(graph=export.name, precision=precision if export.name != "mapper" else "fp32",
                                     sha256=sha, key=export.key, cached=cached, inputs=export.input_names,
                                     outputs=export.output_names, parity_ok=all(r["ok"] for r in graph_rows))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return graphs, rows


def check_artifacts(out: Path, generator: Generator, clip: Clip, mapper: Mapper, fp16: bool) -> dict:
    """The manifest of `out` if it holds all three graphs of exactly these models and precision, each unchanged since
    export and within its parity bounds; ExportError saying what differs otherwise."""
    manifest = read_manifest(out)
    entries = manifest.get("onnx", {})
    suffix = ".fp16" if fp16 else ""
    for graph, key in graph_keys(generator, clip, mapper, fp16).items():
        name = f"{graph}{suffix}.onnx"
        entry = entries.get(name)
        if not entry:
            raise ExportError(f"{out} has no {name}; run t2f-export{' --fp16' if fp16 else ''} --out {out}")
        if entry.get("key") != key:
            raise ExportError(f"{out / name} was exported from other models or versions; run t2f-export again for these")
        if not (out / name).is_file() or sha256_file(out / name) != entry.get("sha256"):
            raise ExportError(f"{out / name} does not match its manifest (missing, corrupt or changed); run t2f-export again")
        if not entry.get("parity_ok"):
            raise ExportError(f"{out / name} failed its parity check; see {out / 'parity.md'}")
    return manifest


def artifacts_current(out: Path, generator: Generator, clip: Clip, mapper: Mapper, fp16: bool) -> bool:
    try:
        check_artifacts(out, generator, clip, mapper, fp16)
        return True
    except ExportError:
        return False


def export_artifacts(out: Path, generator: Generator, clip: Clip, mapper: Mapper, fp16: bool, batches: list[int],
                     sources: dict, log=print) -> tuple[dict, list[dict]]:
    """Export (or reuse) the ONNX graphs, check parity, write parity.md and manifest.json; (manifest, parity rows)."""
    import datetime

    from t2f.io import write_json

    precision = "fp16" if fp16 else "fp32"
    onnx, rows = run_onnx_exports(out, generator, clip, mapper, fp16, batches, log=log)
    manifest = read_manifest(out)
    manifest.update(t2f=t2f.__version__, updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    manifest["models"] = dict(
        generator=dict(name=sources.get("generator"), fingerprint=fingerprint(generator), resolution=generator.resolution,
                       num_ws=generator.num_ws, w_dim=generator.w_dim),
        clip=dict(name=clip.name, fingerprint=clip.fingerprint, context_length=clip.context_length, embed_dim=clip.embed_dim),
        mapper=dict(source=sources.get("mapper"), fingerprint=fingerprint(mapper), z_dim=mapper.z_dim),
    )
    manifest.setdefault("onnx", {}).update(onnx)
    manifest.setdefault("parity", {})[precision] = rows
    with atomic_path(out / "parity.md") as tmp:
        tmp.write_text("\n".join(f"## {p}\n\n{format_table(r)}\n" for p, r in sorted(manifest["parity"].items())))
    write_json(out / MANIFEST, manifest)
    if not all(r["ok"] for r in rows):
        raise ExportError(f"parity outside the bounds for {precision}; see {out / 'parity.md'}")
    return manifest, rows
