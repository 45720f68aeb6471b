"""open_clip text towers other than the standard CLIP one: the exportable rewrite reads its pooling, mask, projection and
end-of-text id from the model, config and tokenizer and equals open_clip's own encode_text; what it cannot express is
refused in one line, runs on `torch` with open_clip's own encoder, and `auto` picks a backend that runs it.

The tiny configs are in tests/data/clip_configs (helpers.tiny_clip_variant registers them with open_clip):
  t2f-tiny-custom   custom_text (CustomTextCLIP with open_clip's TextTransformer), argmax pooling
  t2f-tiny-last     SigLIP's text tower: pooling "last", no causal mask, projection with bias, LayerNorm eps 1e-6, tanh GELU
  t2f-tiny-first    pooling "first" (bidirectional: no causal mask), no projection, LayerScale, QuickGELU
  t2f-tiny-eos      pooling "eos" at the config's eos_id (0, the padding: no constant would find it)
  t2f-tiny-cls      a class token appended to the text and pooled (embed_cls, as CoCa's): not exportable
  t2f-tiny-coca     CoCa itself (its text tower is t2f-tiny-cls's): not exportable
  t2f-tiny-qknorm   custom attention blocks (qk_norm): not exportable
  t2f-tiny-special  a tokenizer with an added special token above the end-of-text id (argmax would pool there): not exportable
"""

import numpy as np
import PIL.Image
import pytest
import torch

from t2f.graphs import TextEncoderGraph, UnsupportedTextTower, example_tokens
from t2f.precision import Precision

from helpers import assert_one_error_line, invoke, tiny_clip_variant

CPU = torch.device("cpu")
PROMPTS = ["a smiling woman", "x", " ".join(["an old man with white hair"] * 6)]     # short, shortest, truncated
clip_of = tiny_clip_variant


def models_of(clip):
    from t2f.engine.backends import Models
    from t2f.presets import random_generator, random_mapper

    generator = random_generator("tiny")
    return Models(generator, clip, random_mapper(generator, clip.embed_dim))


# ----------------------------------------------------------------------------
# The rewrite against open_clip's own encode_text.


@pytest.mark.parametrize("name", ["tiny", "custom", "last", "first", "eos"])
def test_the_rewrite_equals_open_clips_encode_text(name):
    """fp32, random token rows and real prompts (a truncated one among them): the same unit embedding to about 1e-6."""
    clip = clip_of(name)
    graph = TextEncoderGraph(clip)
    with pytest.warns(UserWarning, match="truncated"):
        prompts = clip.tokenize(PROMPTS)
    for tokens in (example_tokens(clip, 6, 0), prompts.to(torch.int32)):
        with torch.no_grad():
            ours, theirs = graph(tokens), clip.text_encoder(tokens.long())
        assert ours.shape == theirs.shape == (len(tokens), clip.embed_dim)
        assert (ours - theirs).abs().max().item() < 2e-6
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)      # the rows differ: the pooling reads the prompt


@pytest.mark.parametrize("name, what", [
    ("cls", "text pooling on an appended class token (embed_cls)"),
    ("coca", "text pooling on an appended class token (embed_cls)"),
    ("qknorm", "the text tower's CustomResidualAttentionBlock attention blocks"),
    ("special", "text pooling 'argmax' with end-of-text id 49407 below the tokenizer's largest id 49408"),
])
def test_what_the_rewrite_cannot_express_is_named_in_one_line(name, what):
    with pytest.raises(UnsupportedTextTower) as info:
        TextEncoderGraph(clip_of(name))
    assert str(info.value) == f"{what} of CLIP t2f-tiny-{name}:random cannot be exported (--backend torch runs open_clip's own encode_text)"


# ----------------------------------------------------------------------------
# Backends: what each can run is said before any work; torch runs open_clip's own encoder.


def test_backends_say_whether_they_run_the_text_tower_before_any_work():
    from t2f.engine.backends import (BACKEND_CLASSES, BackendUnavailable, OnnxRuntimeBackend, OpenVINOBackend, TorchBackend,
                                     choose, make_backend)

    unsupported, supported = models_of(clip_of("cls")), models_of(clip_of("last"))
    assert choose(CPU, models=unsupported) == (TorchBackend, Precision.FP32)
    assert choose(CPU, models=supported) == choose(CPU)            # the usual first choice where the rewrite applies
    TorchBackend.check_available(CPU, Precision.FP32, models=unsupported)
    for name, cls in BACKEND_CLASSES.items():
        if name != "torch":
            with pytest.raises(BackendUnavailable, match=f"^{name} runs t2f's exportable text encoder only: text pooling on "
                                                         "an appended class token .*--backend torch runs open_clip's own"):
                cls.check_available(CPU, Precision.FP32, models=unsupported)
    with pytest.raises(BackendUnavailable, match="class token"):    # not "fp16 needs CUDA" from its last precision tried
        make_backend("onnxruntime", unsupported, CPU)
    OnnxRuntimeBackend.check_available(CPU, Precision.FP32, models=supported)
    OpenVINOBackend.check_available(CPU, Precision.FP32, models=supported)


def test_torch_runs_open_clips_own_text_encoder_and_says_so():
    from t2f.engine import TextToFace

    clip = clip_of("coca")
    generator, _, mapper = models_of(clip)
    pipe = TextToFace(generator, clip, mapper, device="cpu", backend="torch")
    assert pipe.summary == "torch on cpu, fp32 (text_encoder: open_clip's own encode_text)"
    tokens = clip.tokenize(PROMPTS[:2])
    assert torch.equal(pipe.backend.encode(tokens), clip.text_encoder(tokens))


def test_torch_in_bf16_runs_open_clips_encoder_under_autocast():
    from t2f.engine.backends import TorchBackend
    from t2f.precision import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("bf16 on the CPU needs bfloat16 instructions (Precision.check_device)")
    models = models_of(clip_of("cls"))
    backend = TorchBackend(models, CPU, Precision.BF16)
    assert backend.graph_precisions["text_encoder"] is Precision.BF16 and "autocast" in backend.text_encoder_source
    tokens = models.clip.tokenize(PROMPTS[:2])
    half, full = backend.encode(tokens), models.clip.text_encoder(tokens)
    assert half.dtype == torch.float32 and not torch.equal(half, full)        # reduced precision ran ...
    assert torch.nn.functional.cosine_similarity(half, full).min().item() > 0.99   # ... and stayed close


@pytest.mark.gpu
def test_on_cuda_fp16_open_clips_encoder_runs_under_autocast_and_a_siglip_tower_in_one_cuda_graph():
    from t2f.engine.backends import CudaGraphBackend, TorchBackend

    cuda = torch.device("cuda")
    models = models_of(clip_of("cls"))
    tokens = models.clip.tokenize(PROMPTS[:2])
    full = models.clip.text_encoder(tokens)                     # fp32 on the CPU, before the backend moves the model
    backend = TorchBackend(models, cuda, Precision.FP16)
    assert backend.graph_precisions["text_encoder"] is Precision.FP16 and "autocast" in backend.text_encoder_source
    half = backend.encode(tokens).cpu()
    assert torch.nn.functional.cosine_similarity(half, full).min().item() > 0.99

    models = models_of(clip_of("last"))
    tokens = models.clip.tokenize(PROMPTS[:2]).to(cuda)
    z, psi = torch.randn(2, models.mapper.z_dim, device=cuda), torch.full([2], 0.7, device=cuda)
    eager = TorchBackend(models, cuda, Precision.FP16)
    graph = CudaGraphBackend(models, cuda, Precision.FP16)
    assert graph.text_encoder_source is None
    assert (graph(tokens, z, psi).float() - eager(tokens, z, psi).float()).abs().mean().item() < 2.0


def test_flops_of_open_clips_own_text_encoder_are_counted_on_meta():
    """t2f-bench's roofline counts the module `torch` runs: on meta views, the same count as on the real weights."""
    from t2f.engine.roofline import count_flops, stage_flops

    clip = clip_of("cls")
    generator, _, mapper = models_of(clip)
    tokens = example_tokens(clip, 3, 0)
    flops = stage_flops(generator, clip, mapper, 3)["text_encoder"]
    assert flops == count_flops(clip.text_encoder, tokens.long()) > 0
    assert next(clip.model.parameters()).device == CPU          # the caller's model stayed where it was


# ----------------------------------------------------------------------------
# From the command line: a tower the rewrite cannot express trains, runs on torch and auto, and is refused by t2f-export.


def test_a_non_exportable_tower_trains_runs_on_torch_and_auto_and_export_refuses_it(tmp_path, run_cli):
    from t2f.engine.cli import main as infer_main
    from t2f.export.cli import main as export_main
    from t2f.trainer.cli import main as train_main

    clip = ["--generator", "tiny", "--clip", "t2f-tiny-cls:random"]
    run = tmp_path / "run"
    invoke(train_main, [*clip, "--out", run, "--no-progress", "--samples", 64, "--shard-size", 64, "--synth-batch", 32,
                        "--steps", 20, "--batch", 16, "--eval-every", 20, "--checkpoint-every", 20, "--log-every", 10], expect=0)
    assert (run / "model.safetensors").is_file()
    outputs = {}
    for backend in ("torch", "auto"):
        result = run_cli(infer_main, [*clip, "--mapper", run, "--backend", backend, "--device", "cpu", "--out", f"{backend}.png",
                                      "--save-ws", f"{backend}.npy", "a smiling woman", "a child"], tmp_path, expect=0)
        assert "torch on cpu, fp32 (text_encoder: open_clip's own encode_text)" in result.output
        outputs[backend] = np.asarray(PIL.Image.open(tmp_path / f"{backend}.png")), np.load(tmp_path / f"{backend}.npy")
    assert outputs["torch"][0].shape[0] == 2 * 64 and outputs["torch"][0].std() > 0
    assert np.array_equal(outputs["auto"][0], outputs["torch"][0]) and np.array_equal(outputs["auto"][1], outputs["torch"][1])

    result = run_cli(infer_main, [*clip, "--mapper", run, "--backend", "onnxruntime", "--device", "cpu", "a"], tmp_path)
    assert_one_error_line(result, 1, "onnxruntime runs t2f's exportable text encoder only", "embed_cls")
    result = run_cli(export_main, [*clip, "--mapper", run, "--out", "exported", "--onnx-only"], tmp_path)
    assert_one_error_line(result, 1, "text pooling on an appended class token (embed_cls) of CLIP t2f-tiny-cls:random "
                                     "cannot be exported", "--backend torch")
    assert not (tmp_path / "exported").exists()


def test_a_siglip_style_tower_exports_and_matches(tmp_path, run_cli):
    """Pooling "last", no causal mask, a projection bias: exported, parity-checked, and run by onnxruntime as by torch."""
    from t2f.engine import TextToFace
    from t2f.export.cli import main as export_main

    run_cli(export_main, ["--generator", "tiny", "--clip", "t2f-tiny-last:random", "--mapper", "tiny", "--out", "exported",
                          "--onnx-only"], tmp_path, expect=0)
    generator, clip, mapper = models_of(clip_of("last"))
    exported = TextToFace(generator, clip, mapper, device="cpu", backend="onnxruntime", artifacts=str(tmp_path / "exported"))
    eager = TextToFace(generator, clip, mapper, device="cpu", backend="torch")
    assert eager.backend.text_encoder_source is None                 # torch ran the rewrite too
    ours, theirs = exported._text_conditions(PROMPTS[:2]), clip.encode_text(PROMPTS[:2])
    assert (ours - theirs).abs().max().item() < 1e-5
    images = [p(PROMPTS[:2], n=2, seed=0, truncation_psi=0.7).images.int() for p in (exported, eager)]
    assert (images[0] - images[1]).abs().max().item() <= 1
