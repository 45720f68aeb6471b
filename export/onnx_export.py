"""ONNX export of the three graphs, with a cache, checks, and a parity table against eager PyTorch.

Each graph (see `t2f.specs.GraphSpec`) is traced once with the TorchScript exporter (opset 17,
dynamic batch), checked with `onnx.checker`, written to a temporary file and renamed. A graph
whose cache key (weights fingerprint, precision, opset, torch and t2f versions) and file checksum
match the manifest is not exported again.

Parity: every graph runs in ONNX Runtime (CPU) on fresh random valid inputs and is compared
with eager PyTorch fp32; relative error ||onnx - eager|| / ||eager||. The synthesis graph is
compared before its uint8 conversion: its float image is read from the artifact's own graph,
given one extra output (so the artifact is traced and run once, not twin-exported), and its
uint8 image must be within one level of eager's uint8 image in fp32.

bf16 runs the fp32 graphs in OpenVINO with bf16 inference precision. Its parity is measured
the same way, with OpenVINO in bf16 against eager fp32, per graph; a graph outside BF16_BOUNDS
runs fp32 in bf16 runs (the manifest's `graph_precisions` records which), so bf16 is never less
accurate than its bounds. Graphs are simplified with onnxslim where it is installed (constant
folding; the parity check runs on the simplified file).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

import t2f
from t2f.artifacts import OPSET, Manifest, graph_keys, onnx_session, specs_of
from t2f.clip import Clip
from t2f.errors import first_line
from t2f.graphs import GRAPHS, ExportError, ModelDims
from t2f.files import atomic_path, sha256_file
from t2f.io import fingerprint

from t2f.mapper import Mapper
from t2f.precision import Precision
from t2f.specs import GraphSpec
from t2f.stylegan2 import Generator
from t2f.types import StyleGenerator

BOUNDS = {Precision.FP32: 1e-4, Precision.FP16: 2e-2, Precision.BF16: 5e-2}   # relative error of each graph's float output
BF16_BOUNDS = dict(text_encoder_cosine=0.999,  # the embedding's cosine to fp32's, every row (CLIP retrieval keeps its order)
                   synthesis_relative=5e-2,    # the float image's relative error
                   uint8_mean=2.0)             # mean |uint8 difference| in levels (max and p99 are reported, not bounded)
CONTROL_FLOW = ("If", "Loop", "Scan")          # TensorRT's ONNX parser rejects an If with branches of unequal rank


# ----------------------------------------------------------------------------
# Export.


def on_cpu(generator: Generator, clip: Clip, mapper: Mapper):
    """The models on the CPU, copied if they live elsewhere: export and parity run there."""
    if all(next(m.parameters()).device.type == "cpu" for m in (generator, clip.model, mapper)):
        return generator, clip, mapper
    return copy.deepcopy(generator).cpu(), copy.deepcopy(clip).to("cpu"), copy.deepcopy(mapper).cpu()


def export_onnx(module: torch.nn.Module, inputs: tuple, spec: GraphSpec, path: Path) -> None:
    """Trace `module` to ONNX at `path` (atomically), with the spec's names and dynamic axes, simplify it (onnxslim,
    where installed), and check it: a valid model without control flow."""
    import onnx

    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, inputs, str(tmp), input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        simplify(tmp)
        onnx.checker.check_model(str(tmp))
        found = sorted({n.op_type for n in onnx.load(str(tmp), load_external_data=False).graph.node} & set(CONTROL_FLOW))
        if found:
            raise ExportError(f"{path.name} holds control flow ({', '.join(found)}), which TensorRT cannot build")


def simplify(path: Path) -> bool:
    """Fold constants and shape arithmetic of the ONNX file at `path` in place with onnxslim; False where it is not
    installed (the traced graph is kept). Parity is checked afterwards on the file as written."""
    import contextlib
    import io

    import onnx

    from t2f.devices import importable

    if not importable("onnxslim"):
        return False
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):                      # onnxslim prints a summary table
        model = onnxslim.slim(onnx.load(str(path)))
    onnx.save(model, str(path))
    return True


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


# ----------------------------------------------------------------------------
# Parity.


class _OrtRunner:
    """A graph in ONNX Runtime on the CPU (with its float image as a second output where its parity reads that)."""

    def __init__(self, spec: GraphSpec, path: Path, sha: str):
        import onnxruntime

        if spec.float_output:
            if sha256_file(path) != sha:
                raise ExportError(f"{path} changed while it was checked; run t2f-export again")
            self.session = onnxruntime.InferenceSession(with_float_image(path), providers=["CPUExecutionProvider"])
        else:
            self.session = onnx_session(path, sha)

    def __call__(self, feeds: dict) -> list:
        return self.session.run(None, feeds)


class _OpenVINORunner:
    """A graph in OpenVINO's CPU plugin in bf16 (with its float image as a second output where its parity reads that)."""

    def __init__(self, spec: GraphSpec, path: Path, sha: str):
        from t2f.devices import cpu_threads, importable

        if not importable("openvino"):
            raise ExportError('bf16 parity is measured with OpenVINO, which is not installed (pip install "t2f[openvino]")')
        import openvino

        if sha256_file(path) != sha:
            raise ExportError(f"{path} changed while it was checked; run t2f-export again")
        core = openvino.Core()
        model = core.read_model(with_float_image(path) if spec.float_output else path.read_bytes(), b"")
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": cpu_threads()})

    def __call__(self, feeds: dict) -> list:
        result = self.compiled(feeds)
        return [result[out] for out in self.compiled.outputs]


def check_parity_precision(precision: Precision) -> None:
    """ExportError where `precision`'s parity cannot be measured here: bf16 on a CPU without bfloat16 instructions, where
    OpenVINO would run fp32 and call it bf16. export_models asks before any work; t2f-export falls back to fp32."""
    if precision is Precision.BF16 and not precision.runs_on("cpu"):
        raise ExportError("bf16 parity cannot be measured on this CPU: it has no bfloat16 instructions (AVX512_BF16 or AMX)")


def parity(spec: GraphSpec, path: Path, precision: Precision, batches: list[int], generator: StyleGenerator, clip: Clip,
           mapper: Mapper, sha: str) -> list[dict]:
    """Rows of the parity table for one exported graph against eager PyTorch fp32: ONNX Runtime (CPU) for fp32 and fp16
    files, OpenVINO in bf16 for bf16 (the mapper, fp32 in every precision, is checked in ONNX Runtime). The spec says
    what its reference is, which metrics apply and which of its bounds a row must pass (`t2f.specs`)."""
    compute = spec.compute_precision(precision)
    check_parity_precision(compute)
    runner = (_OpenVINORunner if compute is Precision.BF16 else _OrtRunner)(spec, path, sha)
    bound = BOUNDS[compute]
    rows = []
    for batch in batches:
        inputs = spec.example_inputs(batch, 1000 + batch, generator, clip, mapper)
        reference = spec.reference(inputs, generator, clip, mapper)
        outputs = runner({n: t.numpy() for n, t in zip(spec.input_names, inputs)})
        metrics = spec.parity_metrics(outputs, reference)
        row = dict(graph=spec.name, precision=str(precision), batch=batch, bound=bound, runs=str(compute),
                   relative_error=metrics.pop("relative_error"), ok=False, **metrics)
        row["ok"] = spec.parity_ok(row, compute, bound, BF16_BOUNDS)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| graph | precision | runs in | batch | relative error | bound | embedding cosine | uint8 mean / p99 / max diff | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cosine = f"{r['cosine']:.6f}" if "cosine" in r else ""
        u8 = f"{r['uint8_mean_diff']:.2f} / {r['uint8_p99_diff']:.0f} / {r['uint8_max_diff']}" if "uint8_mean_diff" in r else ""
        ok = "yes" if r["ok"] else ("no: runs fp32" if r["precision"] == "bf16" else "NO")
        lines.append(f"| {r['graph']} | {r['precision']} | {r.get('runs', r['precision'])} | {r['batch']} | {r['relative_error']:.2e} | "
                     f"{r['bound']:.0e} | {cosine} | {u8} | {ok} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Export.


def run_onnx_exports(out: Path, generator: Generator, clip: Clip, mapper: Mapper, precision: Precision, batches: list[int],
                     log=print) -> tuple[dict, list[dict]]:
    """Export (or reuse) the three graphs into `out`; returns ({file: entry}, parity rows).

    bf16 exports (reuses) the fp32 files. Parity is checked again only for graphs that were exported now, or that lack
    a passed check in this precision.
    """
    files = precision.onnx
    generator, clip, mapper = on_cpu(generator, clip, mapper)
    specs = specs_of(generator, clip, mapper)
    keys = graph_keys(generator, clip, mapper, files)              # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.read_or_new(out)
    previous, previous_rows = manifest.onnx, manifest.parity.get(precision.value, [])
    graphs, rows = {}, []
    for name in GRAPHS:
        spec = specs[name]
        path = out / spec.file_name(files)
        entry = previous.get(path.name)
        cached = bool(entry and entry.get("key") == keys[name] and path.is_file() and sha256_file(path) == entry.get("sha256"))
        if cached:
            log(f"cached {path.name}")
        else:
            log(f"export {path.name}")
            try:
                module = spec.module(generator, clip, mapper, files)
                export_onnx(module, spec.example_inputs(2, 0, generator, clip, mapper), spec, path)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ExportError(f"cannot export {path.name}: {first_line(e)}") from None
        sha = sha256_file(path)
        old_rows = [r for r in previous_rows if r["graph"] == name and r["batch"] in batches]
        checked = (entry or {}).get("checked", [files.value] if (entry or {}).get("parity_ok") else [])
        if cached and precision.value in checked and len(old_rows) == len(batches):
            graph_rows = old_rows
        else:
            graph_rows = parity(spec, path, precision, batches, generator, clip, mapper, sha)
            checked = ([c for c in checked if c != precision.value] if cached else []) + [precision.value]
        rows += graph_rows
        passed = all(r["ok"] for r in graph_rows)
        graphs[path.name] = dict(graph=name, precision=str(spec.compute_precision(files)), sha256=sha, key=keys[name],
                                 cached=cached, inputs=spec.input_names, outputs=spec.output_names,
                                 # bf16 runs the fp32 file: its own (fp32) check stands, bf16's rows choose its precision
                                 parity_ok=passed if files is precision else bool(cached and entry.get("parity_ok")),
                                 checked=checked)
    return graphs, rows


def export_artifacts(out: Path, generator: Generator, clip: Clip, mapper: Mapper, precision: Precision, batches: list[int],
                     sources: dict, log=print, profile: tuple[int, int, int] | None = None) -> tuple[Manifest, list[dict]]:
    """Export (or reuse) the ONNX graphs, check parity, write parity.md and manifest.json; (manifest, parity rows).

    bf16 first makes sure the fp32 graphs exist and passed their fp32 check, then measures bf16 parity per graph and
    records which graphs run bf16 (the others run fp32). `profile` (MIN, OPT, MAX batch) is recorded for the runtimes
    that build engines from the graphs.
    """
    import datetime

    precision = Precision.parse(precision)                   # a library entry point: "fp32" is accepted too
    if precision is Precision.BF16:
        export_artifacts(out, generator, clip, mapper, Precision.FP32, batches, sources, log, profile)
    onnx, rows = run_onnx_exports(out, generator, clip, mapper, precision, batches, log=log)
    dims = ModelDims.of(generator, clip, mapper)
    manifest = Manifest.read_or_new(out)
    manifest.t2f = t2f.__version__
    manifest.updated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest.models = dict(
        generator=dict(name=sources.get("generator"), fingerprint=fingerprint(generator), resolution=dims.resolution,
                       num_ws=dims.num_ws, w_dim=dims.w_dim, img_channels=dims.img_channels),
        clip=dict(name=clip.name, fingerprint=clip.fingerprint, context_length=dims.context_length, embed_dim=dims.embed_dim),
        mapper=dict(source=sources.get("mapper"), fingerprint=fingerprint(mapper), z_dim=dims.z_dim),
    )
    if profile is not None:
        manifest.batch_profile = tuple(profile)
    if precision is Precision.BF16:
        manifest.graph_precisions["bf16"] = {g: ("bf16" if all(r["ok"] for r in rows if r["graph"] == g) and
                                                 not specs_of(generator, clip, mapper)[g].fp32_only else "fp32") for g in GRAPHS}
    manifest.onnx.update(onnx)
    manifest.parity[precision.value] = rows
    with atomic_path(out / "parity.md") as tmp:
        tmp.write_text("\n".join(f"## {p}\n\n{format_table(r)}\n" for p, r in sorted(manifest.parity.items())))
    manifest.write(out)
    if precision is not Precision.BF16 and not all(r["ok"] for r in rows):
        raise ExportError(f"parity outside the bounds for {precision}; see {out / 'parity.md'}")
    return manifest, rows
