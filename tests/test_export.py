"""t2f-export on the tiny models: ONNX graphs, parity in ONNX Runtime, cache, manifest, bad input; TensorRT where installed."""

import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from t2f.artifacts import check_compatible, onnx_session  # noqa: E402
from t2f.export.cli import main as export_main  # noqa: E402
from t2f.graphs import ExportError  # noqa: E402

from helpers import TINY, invoke, randomize, tiny_pipeline  # noqa: E402

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def export(args, expect=0):
    return invoke(export_main, args, expect)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    export([*TINY, "--out", out, "--onnx-only", "--batch", "1:2:5"])
    export([*TINY, "--out", out, "--onnx-only", "--batch", "1:2:5", "--fp16"])
    return out


def test_graphs_are_simplified_and_free_of_control_flow(exported):
    """onnxslim folds the traced shape arithmetic, and the attention scale is a constant (no Pow), in both precisions;
    the parity rows (checked on the simplified files) pass."""
    import collections

    import onnx

    for name in ("text_encoder.onnx", "text_encoder.fp16.onnx", "synthesis.onnx", "synthesis.fp16.onnx"):
        ops = collections.Counter(n.op_type for n in onnx.load(str(exported / name), load_external_data=False).graph.node)
        assert ops["Pow"] == 0 and ops["Shape"] <= 2 and not {"If", "Loop", "Scan"} & set(ops), (name, ops)
    manifest = json.loads((exported / "manifest.json").read_text())
    assert all(r["ok"] for rows in manifest["parity"].values() for r in rows)


def test_bf16_export_on_a_cpu_without_bf16_says_so_and_what_ran(exported, tmp_path, monkeypatch):
    """A CPU without bfloat16 instructions (simulated: t2f's detection finds none): OpenVINO would run the graphs in fp32
    there, so a bf16 parity check would check fp32 and call it bf16. t2f-export says so, exports and checks fp32, and
    records no graph as checked for bf16; the library refuses a bf16 parity check there."""
    from t2f.artifacts import specs_of
    from t2f.export.onnx_export import parity
    from t2f.precision import Precision

    monkeypatch.setattr("t2f.precision.cpu_has_bf16", lambda: False)
    out = shutil.copytree(exported, tmp_path / "tiny")
    result = export([*TINY, "--out", out, "--precision", "bf16", "--batch", "1:2:5"])
    assert "note: bf16 is not available on this CPU (no AVX512_BF16 or AMX instructions)" in result.output
    assert result.output.splitlines()[-1].startswith(f"wrote {out}: ONNX fp32 (3 graphs, parity ok; not bf16: this CPU has no "
                                                     "bf16 instructions, so fp32 ran and no graph is checked for bf16")
    assert "runs bf16" not in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "bf16" not in manifest["parity"] and "bf16" not in manifest.get("graph_precisions", {})
    assert not [name for name, entry in manifest["onnx"].items() if "bf16" in entry.get("checked", [])]
    pipe = tiny_pipeline()
    spec = specs_of(pipe.generator, pipe.clip, pipe.mapper)["text_encoder"]
    with pytest.raises(ExportError, match="^bf16 parity cannot be measured on this CPU: it has no bfloat16 instructions"):
        parity(spec, out / "text_encoder.onnx", Precision.BF16, [1], pipe.generator, pipe.clip, pipe.mapper, "")


def test_bf16_export_on_a_cpu_without_bf16_is_refused_before_any_work(tmp_path, monkeypatch):
    """The library (export_models) refuses a bf16 export where the CPU has no bf16 instructions (simulated) before it
    loads a model or writes a file; only t2f-export chooses to fall back to fp32 (the test above)."""
    import t2f.sources
    from t2f.export.build import export_models
    from t2f.precision import Precision
    from t2f.sources import ModelSources

    monkeypatch.setattr("t2f.precision.cpu_has_bf16", lambda: False)
    loaded = []
    monkeypatch.setattr(t2f.sources, "load_models", lambda *a, **k: loaded.append(a))
    with pytest.raises(ExportError, match="^bf16 parity cannot be measured on this CPU: it has no bfloat16 instructions"):
        export_models(tmp_path / "out", ModelSources(mapper="tiny"), Precision.BF16, (1, 2, 5), onnx_only=True, log=print)
    assert loaded == [] and os.listdir(tmp_path) == []


def test_bf16_export_states_its_parity_per_graph(exported, tmp_path):
    from t2f.precision import cpu_has_bf16

    pytest.importorskip("openvino", reason='bf16 parity is measured with OpenVINO: pip install -e ".[openvino]"')
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    result = export([*TINY, "--out", out, "--precision", "bf16"])
    assert "writing the ONNX graphs only" in result.output and "cached text_encoder.onnx" in result.output   # fp32 files, reused
    assert "text_encoder runs bf16, mapper runs fp32, synthesis runs bf16" in result.output
    table = (out / "parity.md").read_text()
    assert "## bf16" in table and "| text_encoder | bf16 | bf16 | 1 |" in table and "| mapper | bf16 | fp32 | 1 |" in table
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {(r["graph"], r["batch"]): r for r in manifest["parity"]["bf16"]}
    assert rows[("text_encoder", 1)]["cosine"] >= 0.999 and rows[("synthesis", 1)]["uint8_mean_diff"] <= 2
    result = CliRunner().invoke(export_main, [*TINY, "--out", str(out), "--precision", "bf16", "--fp16"])
    assert result.exit_code == 2 and "contradicts" in result.output


def test_files_and_manifest(exported):
    names = sorted(os.listdir(exported))
    assert names == [".t2f.lock", "manifest.json", "mapper.fp16.onnx", "mapper.onnx", "parity.md", "synthesis.fp16.onnx",
                     "synthesis.onnx", "text_encoder.fp16.onnx", "text_encoder.onnx"]
    manifest = json.loads((exported / "manifest.json").read_text())
    for name, entry in manifest["onnx"].items():
        assert entry["sha256"] == hashlib.sha256((exported / name).read_bytes()).hexdigest()
    assert manifest["models"]["generator"]["resolution"] == 64 and manifest["models"]["clip"]["name"] == "tiny"
    assert manifest["tensorrt"] == {} and manifest["graph_precisions"] == {}


@pytest.mark.parametrize("precision,bound", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_parity_at_two_batch_sizes(exported, precision, bound):
    rows = json.loads((exported / "manifest.json").read_text())["parity"][precision]
    # --batch 1:2:5: the smallest batch and the largest up to PARITY_MAX_BATCH (3; the graphs are traced at 2).
    assert {(r["graph"], r["batch"]) for r in rows} == {(g, b) for g in ("text_encoder", "mapper", "synthesis") for b in (1, 3)}
    for r in rows:
        expected = 1e-4 if r["graph"] == "mapper" else bound            # the mapper runs in fp32 in both
        assert r["ok"] and r["relative_error"] <= expected and r["bound"] == expected
    if precision == "fp16":   # fp16 really changed the numbers, within the bound
        assert max(r["relative_error"] for r in rows if r["graph"] == "text_encoder") > 1e-5
    assert "| synthesis | " + precision in (exported / "parity.md").read_text()


def test_graph_interfaces(exported):
    text = onnx_session(exported / "text_encoder.onnx")
    assert [(i.name, i.type) for i in text.get_inputs()] == [("tokens", "tensor(int32)")]
    synthesis = onnx_session(exported / "synthesis.fp16.onnx")
    assert synthesis.get_outputs()[0].type == "tensor(uint8)"
    ws = np.random.default_rng(0).standard_normal((3, 10, 32)).astype(np.float32)
    image = synthesis.run(None, {"ws": ws})[0]
    assert image.shape == (3, 64, 64, 3) and image.dtype == np.uint8
    mapper = onnx_session(exported / "mapper.onnx")
    assert [i.name for i in mapper.get_inputs()] == ["embedding", "z", "psi"]


def test_end_to_end_onnx_matches_the_pytorch_pipeline(exported):
    from t2f.engine.pipeline import sample_z

    pipe = tiny_pipeline()
    faces = pipe(["a smiling woman"], n=2, seed=4, truncation_psi=0.7)
    tokens = pipe.clip.tokenize(["a smiling woman"]).numpy().astype(np.int32).repeat(2, axis=0)
    e = onnx_session(exported / "text_encoder.onnx").run(None, {"tokens": tokens})[0]
    z = sample_z(4, 1, 2, pipe.mapper.z_dim).numpy()
    ws = onnx_session(exported / "mapper.onnx").run(None, {"embedding": e, "z": z, "psi": np.full([2], 0.7, np.float32)})[0]
    assert np.abs(ws - faces.ws.numpy()).max() < 1e-4
    image = onnx_session(exported / "synthesis.onnx").run(None, {"ws": ws})[0]
    assert np.abs(image.astype(int) - faces.images.numpy().astype(int)).max() <= 1


def test_rerun_rebuilds_nothing(exported):
    before = {p: os.stat(exported / p).st_mtime_ns for p in os.listdir(exported) if p.endswith(".onnx")}
    result = export([*TINY, "--out", exported, "--onnx-only", "--batch", "1:2:5"])
    assert result.output.count("cached ") == 3 and "export " not in result.output
    assert {p: os.stat(exported / p).st_mtime_ns for p in before} == before


def test_changed_weights_are_exported_again(exported, tmp_path):
    from t2f.weights import save_generator
    from t2f.presets import random_generator

    out = tmp_path / "out"
    shutil.copytree(exported, out)
    save_generator(randomize(random_generator("tiny"), seed=5), tmp_path / "g2")
    result = export(["--mapper", "tiny", "--generator", tmp_path / "g2", "--clip", "tiny", "--out", out, "--onnx-only", "--batch", "1:2:5"])
    assert "export synthesis.onnx" in result.output and "cached text_encoder.onnx" in result.output


def test_corrupted_onnx_is_refused_at_load_and_rebuilt(exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "mapper.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ExportError, match="does not match its manifest"):
        onnx_session(out / "mapper.onnx", manifest["onnx"]["mapper.onnx"]["sha256"])
    result = export([*TINY, "--out", out, "--onnx-only", "--batch", "1:2:5"])
    assert "export mapper.onnx" in result.output
    onnx_session(out / "mapper.onnx", json.loads((out / "manifest.json").read_text())["onnx"]["mapper.onnx"]["sha256"])


@pytest.mark.parametrize("args,code,fragment", [
    (["--mapper", "missing-run", "--out", "o", "--onnx-only"], 2, "not a mapper directory"),
    ([*TINY, "--out", "o", "--onnx-only", "--batch", "4:2:8"], 2, "MIN <= OPT <= MAX"),
    ([*TINY, "--out", "o", "--onnx-only", "--batch", "0:1:2"], 2, "MIN <= OPT <= MAX"),
    ([*TINY, "--out", "blocker/o", "--onnx-only"], 2, "cannot write"),
])
def test_bad_input(tmp_path, monkeypatch, args, code, fragment):
    (tmp_path / "blocker").write_text("a file")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(export_main, [str(a) for a in args])
    assert result.exit_code == code and fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


@pytest.mark.skipif(HAVE_TENSORRT, reason="checks the message shown where TensorRT is missing")
def test_tensorrt_missing_fails_before_any_work(tmp_path):
    result = CliRunner().invoke(export_main, [*TINY, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "TensorRT is not installed" in result.output and "--onnx-only" in result.output
    assert not (tmp_path / "o").exists()


def test_engines_for_another_gpu_or_tensorrt_are_refused():
    from t2f.artifacts import Manifest

    built = Manifest(tensorrt={"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    check_compatible(built, dict(built.tensorrt))
    with pytest.raises(ExportError, match="TensorRT version '10.3.0'.*run t2f-export again"):
        check_compatible(built, dict(built.tensorrt, tensorrt="10.8.0"))
    with pytest.raises(ExportError, match="GPU 'NVIDIA H100 80GB HBM3'"):
        check_compatible(built, dict(built.tensorrt, gpu="NVIDIA H200"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT is needed (it is not installed here)")
def test_tensorrt_engines_build_and_load(tmp_path):
    from t2f.artifacts import Manifest, load_engine

    out = tmp_path / "trt"
    export([*TINY, "--out", out, "--fp16", "--batch", "1:2:4"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["tensorrt"]["engines"]) == {"text_encoder.fp16.plan", "mapper.fp16.plan", "synthesis.fp16.plan"}
    for name in manifest["tensorrt"]["engines"]:
        assert load_engine(out / name, Manifest.read(out)) is not None
    result = export([*TINY, "--out", out, "--fp16", "--batch", "1:2:4"])
    assert result.output.count("cached ") == 6


# ----------------------------------------------------------------------------
# What TensorRT needs from the graphs, checked on the exported files.


def test_no_graph_holds_control_flow(exported):
    """TensorRT's ONNX parser rejects an If whose branches differ in rank (squeeze(1) exported one)."""
    import onnx

    for name in sorted(p for p in os.listdir(exported) if p.endswith(".onnx")):
        ops = {n.op_type for n in onnx.load(str(exported / name)).graph.node}
        assert not ops & {"If", "Loop", "Scan"}, name


@pytest.mark.parametrize("name", ["synthesis.onnx", "synthesis.fp16.onnx"])
def test_synthesis_conv_weights_are_constants(exported, name):
    """Every convolution's weight is a stored constant: the fp16 pre-normalization, the transposes and casts are folded."""
    import onnx

    model = onnx.load(str(exported / name))
    constants = {i.name: i for i in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    # tiny, 5 resolutions: 4x4 conv and torgb; then per resolution up-conv, its blur, conv, torgb, the image's up-sampling.
    assert len(convs) == 2 + 5 * 4
    assert [n.name for n in convs if n.input[1] not in constants] == []     # no op feeds any weight
    dtypes = {onnx.TensorProto.DataType.Name(constants[n.input[1]].data_type) for n in convs}
    assert dtypes == ({"FLOAT16", "FLOAT"} if name.endswith(".fp16.onnx") else {"FLOAT"})


def test_attention_is_scaled_before_the_product(tiny_clip):
    """q is scaled before q @ k^T, as PyTorch's attention does: a product that only fits fp16 once scaled stays finite."""
    import copy

    import torch.nn.functional as F

    from t2f.clip import Clip
    from t2f.graphs import TextEncoderGraph, _layer_norm_fp32, example_tokens
    from t2f.precision import Precision

    model = copy.deepcopy(tiny_clip.model)
    clip = Clip(model, tiny_clip.tokenizer, tiny_clip.spec)
    tokens = example_tokens(tiny_clip, 2, 0)
    attn = model.transformer.resblocks[0].attn
    width, head = attn.embed_dim, attn.embed_dim // attn.num_heads
    with torch.no_grad():
        graph = TextEncoderGraph(clip)
        x = _layer_norm_fp32(graph.resblocks[0].ln_1, graph.token_embedding(tokens) + graph.positional_embedding)
        q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (t.reshape(2, -1, attn.num_heads, head).transpose(1, 2) for t in (q, k))
        largest = (q @ k.transpose(-1, -2)).abs().max().item()
        factor = (65504 * 2 / largest) ** 0.5                 # unscaled: twice fp16's largest value; scaled by head**-0.5: fits
        assert 65504 * 2 * head ** -0.5 < 65504
        attn.in_proj_weight[: 2 * width] *= factor
        attn.in_proj_bias[: 2 * width] *= factor
        full = TextEncoderGraph(clip)(tokens)
        half = TextEncoderGraph(clip, Precision.FP16)(tokens)
    assert torch.isfinite(half).all()
    assert ((half - full).norm() / full.norm()).item() < 2e-2


@pytest.mark.slow
def test_image_channels_come_from_the_manifest(tiny_clip, tmp_path):
    """A one-channel generator: the onnxruntime backend sizes its output from the manifest, not a hard-coded 3."""
    from t2f.engine.backends import OnnxRuntimeBackend
    from t2f.export.onnx_export import export_artifacts
    from t2f.precision import Precision
    from t2f.presets import GENERATOR_ARCHS, random_mapper
    from t2f.stylegan2 import Generator, GeneratorConfig, to_uint8

    config = GeneratorConfig.from_dict(dict(GENERATOR_ARCHS["tiny"].to_dict(), img_channels=1))
    torch.manual_seed(0)
    generator = Generator(config).eval().requires_grad_(False)
    mapper = random_mapper(generator, tiny_clip.embed_dim)
    manifest, _ = export_artifacts(tmp_path / "gray", generator, tiny_clip, mapper, "fp32", [1], {})
    assert manifest.models["generator"]["img_channels"] == 1
    backend = OnnxRuntimeBackend((generator, tiny_clip, mapper), torch.device("cpu"), Precision.FP32, tmp_path / "gray")
    ws = generator.mapping(torch.randn(3, config.z_dim))
    image = backend.synthesize(ws)
    assert image.shape == (3, 64, 64, 1)
    assert (image.int() - to_uint8(generator.synthesis(ws)).int()).abs().max() <= 1


def test_specs_own_names_profiles_and_files(tiny_clip):
    from t2f.graphs import ModelDims
    from t2f.precision import Precision
    from t2f.presets import random_generator, random_mapper
    from t2f.specs import graph_specs

    g = random_generator("tiny")
    specs = graph_specs(ModelDims.of(g, tiny_clip, random_mapper(g, tiny_clip.embed_dim)))
    assert list(specs) == ["text_encoder", "mapper", "synthesis"]
    assert specs["mapper"].input_names == ["embedding", "z", "psi"] and specs["synthesis"].output_names == ["image"]
    assert specs["synthesis"].file_name(Precision.FP16, "plan") == "synthesis.fp16.plan"
    assert specs["text_encoder"].file_name("fp32") == "text_encoder.onnx"
    assert specs["mapper"].profile((1, 2, 8)) == {"embedding": ((1, 128), (2, 128), (8, 128)), "z": ((1, 16), (2, 16), (8, 16)),
                                                  "psi": ((1,), (2,), (8,))}
    assert specs["synthesis"].output_shape(4) == (4, 64, 64, 3) and specs["synthesis"].output.dtype == torch.uint8
    assert specs["text_encoder"].dynamic_axes == {"tokens": {0: "batch"}, "embedding": {0: "batch"}}


def test_runtime_info_asks_about_the_target_device(monkeypatch):
    """Our control flow only, with stand-ins for TensorRT and CUDA (neither ran): cuda:N is the device asked about."""
    import types

    import t2f.artifacts as trt

    asked = []
    monkeypatch.setattr(trt, "tensorrt_module", lambda: types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or "NVIDIA H100 80GB HBM3")
    info = trt.runtime_info(torch.device("cuda", 1))
    assert info == {"tensorrt": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert asked == [torch.device("cuda", 1)] * 2
