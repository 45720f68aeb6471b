"""The backend contract in code: an abstract base, one constructor, self-registration (and entry points), `auto`'s lists
made from what the classes declare, the docs' tables made from them, and the documented one-file example backend."""

import importlib.util
import os
import re

import pytest
import torch

import t2f.engine.backends.registry as registry
from helpers import tiny_pipeline
from t2f.engine.backends import Backend, BackendUnavailable, Models, TorchBackend, choose, make_backend, preference, register
from t2f.engine.backends.docs import main as docs_main
from t2f.engine.backends.docs import update
from t2f.engine.pipeline import TextToFace
from t2f.precision import Precision

CPU = torch.device("cpu")
ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLE = os.path.join(ROOT, "docs", "examples", "example_backend.py")
FP32, FP16, BF16 = Precision.FP32, Precision.FP16, Precision.BF16


@pytest.fixture
def own_registry(monkeypatch):
    """A copy of the registry for this test: what it registers is gone after it."""
    monkeypatch.setattr(registry, "BACKEND_CLASSES", dict(registry.BACKEND_CLASSES))
    return registry.BACKEND_CLASSES


def test_autos_lists_from_the_classes_are_the_measured_order():
    """t2f's own backends' ranks give exactly the order measured end to end (docs/backends.md says why)."""
    assert preference("cpu", registry.builtin_classes()) == [
        ("openvino", BF16), ("openvino", FP32), ("onnxruntime", FP32), ("torch", FP32), ("torch", BF16)]
    assert preference("cuda", registry.builtin_classes()) == [
        ("tensorrt", FP16), ("torch-cudagraph", FP16), ("onnxruntime", FP16), ("torch", FP16),
        ("tensorrt", FP32), ("onnxruntime", FP32), ("torch", FP32)]
    assert registry.backend_names() == ("torch", "torch-cudagraph", "torch-compile", "onnxruntime", "openvino",
                                        "onnxruntime-tensorrt", "tensorrt")


@pytest.mark.parametrize("name", ["README.md", os.path.join("docs", "backends.md")])
def test_the_documented_backend_tables_are_the_classes(name):
    """README.md's and docs/backends.md's tables are what `python -m t2f.engine.backends.docs` makes of the classes."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        text = f.read()
    assert "<!-- backends:auto -->\n| device | `auto` tries, in this order |" in text
    assert update(text) == text, f"rewrite the tables: python -m t2f.engine.backends.docs {name}"
    assert docs_main(["--check", os.path.join(ROOT, name)]) == 0


def test_the_docs_command_rewrites_a_stale_table_and_check_says_so(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- backends:auto -->\n| stale |\n<!-- /backends:auto -->\nafter\n")
    assert docs_main(["--check", str(doc)]) == 1 and "| stale |" in doc.read_text()
    assert docs_main([str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("before\n<!-- backends:auto -->\n| device |") and text.endswith("<!-- /backends:auto -->\nafter\n")
    assert "| CPU | 1. `openvino` | bf16 |" in text and docs_main(["--check", str(doc)]) == 0
    with pytest.raises(ValueError, match="no backend table 'nope'"):
        update("<!-- backends:nope -->\n<!-- /backends:nope -->")
    os.mkfifo(tmp_path / "fifo.md")                         # never opened: no hang
    assert docs_main([]) == docs_main([str(tmp_path / "missing.md")]) == docs_main(["--check", str(tmp_path / "fifo.md")]) == 2


def test_an_incomplete_or_clashing_backend_is_refused(own_registry):
    class Half(Backend):
        name = "half"

        def encode(self, tokens):
            return tokens

    with pytest.raises(TypeError):                              # abstract: map and synthesize are missing
        Half(None, CPU, FP32)
    with pytest.raises(TypeError, match="not a Backend subclass"):
        register(Half)

    class Clash(TorchBackend):
        pass

    with pytest.raises(TypeError, match="'torch' is taken"):
        register(Clash)

    class Ranked(TorchBackend):
        name, devices, auto_rank = "ranked", ("cpu",), {"cpu": {FP16: 1}}

    with pytest.raises(TypeError, match="ranked ranks cpu fp16"):
        register(Ranked)
    assert "half" not in own_registry and "ranked" not in own_registry


def _load_example():
    spec = importlib.util.spec_from_file_location("example_backend", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_example_backend_registers_runs_and_matches_torch(own_registry):
    """docs/backends.md holds the example file verbatim; importing it registers it, it is picked by name, it gives
    the torch backend's images, and `auto` never picks it (it declares no rank)."""
    with open(os.path.join(ROOT, "docs", "backends.md"), encoding="utf-8") as f:
        doc = f.read()
    with open(EXAMPLE, encoding="utf-8") as f:
        source = f.read()
    assert f"```python\n{source}```" in doc
    assert "example" not in own_registry
    module = _load_example()
    assert own_registry["example"] is module.ExampleBackend
    base = tiny_pipeline()
    models = Models(base.generator, base.clip, base.mapper)
    assert choose(CPU, "example") == (module.ExampleBackend, FP32)
    assert ("example", FP32) not in preference("cpu") and choose(CPU, "auto", models=models)[0].name != "example"
    with pytest.raises(BackendUnavailable, match="example runs in fp32 only|example runs in fp32, not bf16"):
        make_backend("example", models, CPU, BF16)
    pipe = TextToFace(base.generator, base.clip, base.mapper, device="cpu", backend="example", batch_size=base.batch_size)
    assert pipe.backend.name == "example" and pipe.summary == "example on cpu, fp32"
    faces, reference = pipe(["a smiling woman", "a child"], n=2, seed=3), base(["a smiling woman", "a child"], n=2, seed=3)
    assert faces.images.shape == reference.images.shape == (4, 64, 64, 3) and faces.images.dtype == torch.uint8
    assert ((faces.ws - reference.ws).norm() / reference.ws.norm()) < 1e-5
    assert (faces.images.int() - reference.images.int()).abs().max() <= 1 and faces.images.float().std() > 0
    assert pipe.generator is None and pipe.clip.text_encoder is None        # the pipeline let go of what it does not run


def test_entry_points_register_a_class_or_a_module_and_a_broken_one_is_left_out(own_registry):
    class Entry:
        def __init__(self, name, value, load):
            self.name, self.value, self.load = name, value, load

    class Plugin(TorchBackend):
        name = "plugin"

    def broken():
        raise ImportError("No module named 'missing_runtime'")

    with pytest.warns(RuntimeWarning, match=re.escape("backend entry point bad (bad.mod) does not load: No module named")):
        failed = registry.load_entry_points([Entry("plugin", "x:Plugin", lambda: Plugin), Entry("bad", "bad.mod", broken),
                                             Entry("example", "example_backend", _load_example)])
    assert failed == ["bad"] and own_registry["plugin"] is Plugin and own_registry["example"].__name__ == "ExampleBackend"
    assert registry.builtin_classes().keys() == set(registry.backend_names()) - {"plugin", "example"}


def test_every_backend_reports_its_graphs_compute_precisions_the_mapper_fp32(monkeypatch):
    """graph_precisions comes from each graph spec's compute precision, in the base class: the mapper is fp32 at fp16
    for every backend (TensorRT's mapper engine is built fp32, export/tensorrt.py), OpenVINO alone reading its manifest."""
    from t2f.engine.backends import BACKEND_CLASSES, CudaGraphBackend, TorchCompileBackend
    from t2f.specs import compute_precisions

    assert compute_precisions(FP16) == {"text_encoder": FP16, "mapper": FP32, "synthesis": FP16}
    assert compute_precisions(BF16) == {"text_encoder": BF16, "mapper": FP32, "synthesis": BF16}
    assert compute_precisions(FP32) == dict.fromkeys(("text_encoder", "mapper", "synthesis"), FP32)
    for name, cls in BACKEND_CLASSES.items():             # what Backend.__init__ sets for every class, TensorRT's included
        backend = cls.__new__(cls)
        Backend.__init__(backend, None, CPU, FP16)
        assert backend.graph_precisions == compute_precisions(FP16), name
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)        # construction only
    base = tiny_pipeline()
    models = Models(base.generator, base.clip, base.mapper)
    for cls in (TorchBackend, CudaGraphBackend, TorchCompileBackend):               # made for real (nothing runs)
        assert cls(models, CPU, FP16).graph_precisions == compute_precisions(FP16), cls.name
