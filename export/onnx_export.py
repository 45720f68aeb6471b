"""ONNX export of the three graphs, with a cache, checks, and a parity table against eager PyTorch.

Each graph (see `t2f.graphs.GraphSpec`) is traced once with the TorchScript exporter (opset 17,
dynamic batch), checked with `onnx.checker`, written to a temporary file and renamed. A graph
whose cache key (weights fingerprint, precision, opset, torch and t2f versions) and file checksum
match the manifest is not exported again.

Parity: every graph runs in ONNX Runtime (CPU) on fresh random valid inputs and is compared
with eager PyTorch fp32; relative error ||onnx - eager|| / ||eager||. The synthesis graph is
compared before its uint8 conversion: its float image is read from the artifact's own graph,
given one extra output (so the artifact is traced and run once, not twin-exported), and its
uint8 image must be within one level of eager's uint8 image in fp32.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

import t2f
from t2f.clip import Clip
from t2f.graphs import GRAPHS, ExportError, GraphSpec, MapperGraph, ModelDims, graph_specs
from t2f.io import atomic_path, fingerprint, sha256_file, write_json
from t2f.mapper import Mapper
from t2f.precision import Precision
from t2f.stylegan2 import Generator, to_uint8

OPSET = 17
BOUNDS = {Precision.FP32: 1e-4, Precision.FP16: 2e-2}
MANIFEST = "manifest.json"
CONTROL_FLOW = ("If", "Loop", "Scan")          # TensorRT's ONNX parser rejects an If with branches of unequal rank


def read_manifest(out: Path) -> dict:
    """`out`'s export manifest; {} if there is none or it is unreadable (an export then starts afresh)."""
    try:
        return check_manifest(out)
    except ExportError:
        return {}


def specs_of(generator: Generator, clip: Clip, mapper: Mapper) -> dict[str, GraphSpec]:
    return graph_specs(ModelDims.of(generator, clip, mapper))


def check_manifest(out: Path) -> dict:
    """`out`'s export manifest, or ExportError saying why `out` is not a t2f-export output."""
    path = out / MANIFEST
    if not path.is_file():
        raise ExportError(f"{out} has no {MANIFEST}: it is not a t2f-export output; run t2f-export --out {out}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ExportError(f"{path} is unreadable or not JSON ({type(e).__name__}); run t2f-export --out {out} again") from None
    if not is_export_manifest(manifest):
        raise ExportError(f"{path} is not a t2f-export manifest; run t2f-export into another directory")
    return manifest


def is_export_manifest(manifest) -> bool:
    return isinstance(manifest, dict) and isinstance(manifest.get("onnx"), dict) and "t2f" in manifest


# What an export directory holds: the graphs, engines, their record, and temporaries of a killed export.
EXPORT_NAMES = re.compile(r"(text_encoder|mapper|synthesis)(\.fp16)?\.(onnx|plan)|parity\.md|manifest\.json|timing\.cache"
                          r"|\.t2f\.lock|\.parity-.*|\..+\.(tmp|old)")


def foreign_files(out: Path) -> list[str]:
    """Files in `out` that t2f-export did not make (a manifest.json that is not an export's counts as one)."""
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not EXPORT_NAMES.fullmatch(n)]
    if MANIFEST in names:
        try:
            if not (out / MANIFEST).is_file() or not is_export_manifest(json.loads((out / MANIFEST).read_text())):
                foreign.append(MANIFEST)                   # a FIFO there is never opened
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            foreign.append(MANIFEST)
    return foreign


def remove_stale_temporaries(out: Path) -> list[str]:
    """Remove what a killed export left in `out` (.parity-* scratch directories, .*.tmp files); call with its lock held."""
    removed = []
    for p in out.iterdir():
        if not (p.name.startswith(".parity-") or (p.name.startswith(".") and p.name.endswith((".tmp", ".old")))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


# ----------------------------------------------------------------------------
# Export.


def graph_keys(generator: Generator, clip: Clip, mapper: Mapper, precision: Precision) -> dict[str, str]:
    """Cache keys of the three graphs: weights, configs, precision, opset and versions."""
    precision = Precision.parse(precision)
    versions = f"t2f {t2f.__version__} torch {torch.__version__} opset {OPSET}"
    gcfg = json.dumps(generator.config.to_dict(), sort_keys=True)
    mcfg = json.dumps(mapper.config.to_dict(), sort_keys=True)
    return {
        "text_encoder": f"{clip.name} {clip.fingerprint} {precision} {versions}",
        "mapper": f"{fingerprint(mapper)} {mcfg} w_avg {fingerprint(generator.mapping)} fp32 {versions}",
        "synthesis": f"{fingerprint(generator)} {gcfg} {precision} uint8 folded {versions}",
    }


def on_cpu(generator: Generator, clip: Clip, mapper: Mapper):
    """The models on the CPU, copied if they live elsewhere: export and parity run there."""
    if all(next(m.parameters()).device.type == "cpu" for m in (generator, clip.model, mapper)):
        return generator, clip, mapper
    return copy.deepcopy(generator).cpu(), copy.deepcopy(clip).to("cpu"), copy.deepcopy(mapper).cpu()


def export_onnx(module: torch.nn.Module, inputs: tuple, spec: GraphSpec, path: Path) -> None:
    """Trace `module` to ONNX at `path` (atomically), with the spec's names and dynamic axes, and check it."""
    import onnx

    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, inputs, str(tmp), input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
        found = sorted({n.op_type for n in onnx.load(str(tmp), load_external_data=False).graph.node} & set(CONTROL_FLOW))
        if found:
            raise ExportError(f"{path.name} holds control flow ({', '.join(found)}), which TensorRT cannot build")


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


def with_float_image(path: Path) -> bytes:
    """The synthesis graph at `path` with its float NCHW image (the input of to_uint8's Transpose) as a second output."""
    import onnx

    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    name = model.graph.output[0].name
    while name in producers:
        node = producers[name]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if node.op_type == "Transpose" and perm == [0, 2, 3, 1]:
            model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
            return model.SerializeToString()
        name = node.input[0]
    raise ExportError(f"{path.name}: no NCHW -> NHWC transpose before the uint8 image")


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def parity(spec: GraphSpec, path: Path, precision: Precision, batches: list[int], generator: Generator, clip: Clip,
           mapper: Mapper, sha: str) -> list[dict]:
    """Rows of the parity table for one exported graph: ONNX Runtime (CPU) against eager PyTorch fp32."""
    import onnxruntime

    if spec.name == "synthesis":
        if sha256_file(path) != sha:
            raise ExportError(f"{path} changed while it was checked; run t2f-export again")
        session = onnxruntime.InferenceSession(with_float_image(path), providers=["CPUExecutionProvider"])
    else:
        session = onnx_session(path, sha)
    bound = BOUNDS[spec.compute_precision(precision)]
    rows = []
    for batch in batches:
        inputs = spec.example_inputs(batch, 1000 + batch, generator, clip, mapper)
        feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
        with torch.no_grad():
            if spec.name == "text_encoder":
                reference = clip.text_encoder(inputs[0].long())
            elif spec.name == "mapper":
                reference = MapperGraph(mapper, generator.w_avg)(*inputs)
            else:
                reference = generator.synthesis(inputs[0], noise_mode="const")
        outputs = session.run(None, feeds)
        row = dict(graph=spec.name, precision=str(precision), batch=batch, bound=bound,
                   relative_error=relative_error(outputs[-1], reference.numpy()))
        row["ok"] = row["relative_error"] <= bound
        if spec.name == "synthesis":
            image = outputs[0].astype(np.int32)
            row["uint8_max_diff"] = int(np.abs(image - to_uint8(reference).numpy().astype(np.int32)).max())
            row["ok"] = row["ok"] and (precision.half or row["uint8_max_diff"] <= 1)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| graph | precision | batch | relative error | bound | uint8 max diff | ok |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['precision']} | {r['batch']} | {r['relative_error']:.2e} | {r['bound']:.0e} | "
                     f"{r.get('uint8_max_diff', '')} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def run_onnx_exports(out: Path, generator: Generator, clip: Clip, mapper: Mapper, precision: Precision, batches: list[int],
                     log=print) -> tuple[dict, list[dict]]:
    """Export (or reuse) the three graphs into `out`; returns ({file: entry}, parity rows).

    Parity is checked again only for graphs that were exported now, or that lack a passed check.
    """
    precision = Precision.parse(precision)
    generator, clip, mapper = on_cpu(generator, clip, mapper)
    specs = specs_of(generator, clip, mapper)
    keys = graph_keys(generator, clip, mapper, precision)          # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    previous, previous_rows = manifest.get("onnx", {}), (manifest.get("parity") or {}).get(precision.value, [])
    graphs, rows = {}, []
    for name in GRAPHS:
        spec = specs[name]
        path = out / spec.file_name(precision)
        entry = previous.get(path.name)
        cached = bool(entry and entry.get("key") == keys[name] and path.is_file() and sha256_file(path) == entry.get("sha256"))
        if cached:
            log(f"cached {path.name}")
        else:
            log(f"export {path.name}")
            try:
                module = spec.module(generator, clip, mapper, precision)
                export_onnx(module, spec.example_inputs(2, 0, generator, clip, mapper), spec, path)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ExportError(f"cannot export {path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        sha = sha256_file(path)
        old_rows = [r for r in previous_rows if r["graph"] == name and r["batch"] in batches]
        if cached and entry.get("parity_ok") and len(old_rows) == len(batches):
            graph_rows = old_rows
        else:
            graph_rows = parity(spec, path, precision, batches, generator, clip, mapper, sha)
        rows += graph_rows
        graphs[path.name] = dict(graph=name, precision=str(spec.compute_precision(precision)), sha256=sha, key=keys[name],
                                 cached=cached, inputs=spec.input_names, outputs=spec.output_names,
                                 parity_ok=all(r["ok"] for r in graph_rows))
    return graphs, rows


def check_artifacts(out: Path, generator: Generator, clip: Clip, mapper: Mapper, precision: Precision) -> dict:
    """The manifest of `out` if it holds all three graphs of exactly these models and precision, each unchanged since
    export and within its parity bounds; ExportError saying what differs otherwise."""
    precision = Precision.parse(precision)
    manifest = check_manifest(out)
    entries = manifest.get("onnx", {})
    specs = specs_of(generator, clip, mapper)
    for graph, key in graph_keys(generator, clip, mapper, precision).items():
        name = specs[graph].file_name(precision)
        entry = entries.get(name)
        if not entry:
            raise ExportError(f"{out} has no {name}; run t2f-export{' --fp16' if precision.half else ''} --out {out}")
        if entry.get("key") != key:
            raise ExportError(f"{out / name} was exported from other models or versions; run t2f-export again for these")
        if not (out / name).is_file() or sha256_file(out / name) != entry.get("sha256"):
            raise ExportError(f"{out / name} does not match its manifest (missing, corrupt or changed); run t2f-export again")
        if not entry.get("parity_ok"):
            raise ExportError(f"{out / name} failed its parity check; see {out / 'parity.md'}")
    if ModelDims.from_manifest(manifest.get("models") or {}) != ModelDims.of(generator, clip, mapper):
        raise ExportError(f"{out / MANIFEST} records other model sizes; run t2f-export again")
    return manifest


def artifacts_current(out: Path, generator: Generator, clip: Clip, mapper: Mapper, precision: Precision) -> bool:
    try:
        check_artifacts(out, generator, clip, mapper, precision)
        return True
    except ExportError:
        return False


def export_artifacts(out: Path, generator: Generator, clip: Clip, mapper: Mapper, precision: Precision, batches: list[int],
                     sources: dict, log=print, profile: tuple[int, int, int] | None = None) -> tuple[dict, list[dict]]:
    """Export (or reuse) the ONNX graphs, check parity, write parity.md and manifest.json; (manifest, parity rows).

    `profile` (MIN, OPT, MAX batch) is recorded for the runtimes that build engines from the graphs.
    """
    import datetime

    precision = Precision.parse(precision)
    onnx, rows = run_onnx_exports(out, generator, clip, mapper, precision, batches, log=log)
    dims = ModelDims.of(generator, clip, mapper)
    manifest = read_manifest(out)
    manifest.update(t2f=t2f.__version__, updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    manifest["models"] = dict(
        generator=dict(name=sources.get("generator"), fingerprint=fingerprint(generator), resolution=dims.resolution,
                       num_ws=dims.num_ws, w_dim=dims.w_dim, img_channels=dims.img_channels),
        clip=dict(name=clip.name, fingerprint=clip.fingerprint, context_length=dims.context_length, embed_dim=dims.embed_dim),
        mapper=dict(source=sources.get("mapper"), fingerprint=fingerprint(mapper), z_dim=dims.z_dim),
    )
    if profile is not None:
        manifest["batch_profile"] = list(profile)
    manifest.setdefault("onnx", {}).update(onnx)
    manifest.setdefault("parity", {})[precision.value] = rows
    with atomic_path(out / "parity.md") as tmp:
        tmp.write_text("\n".join(f"## {p}\n\n{format_table(r)}\n" for p, r in sorted(manifest["parity"].items())))
    write_json(out / MANIFEST, manifest)
    if not all(r["ok"] for r in rows):
        raise ExportError(f"parity outside the bounds for {precision}; see {out / 'parity.md'}")
    return manifest, rows
