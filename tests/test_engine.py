"""The PyTorch-backend pipeline: prompts -> uint8 faces and their ws."""

import pytest
import torch

from helpers import randomize, tiny_pipeline
from t2f.engine import TextToFace, load_pipeline, resolve_device, sample_z
from t2f.engine.pipeline import face_tensor
from t2f.engine import MissingMapperError
from t2f.mapper import Mapper, MapperConfig
from t2f.presets import random_generator


def test_shapes_and_types(pipe):
    faces = pipe(["a smiling woman", "an old man"], n=3, seed=0, truncation_psi=0.7)
    g = pipe.generator
    assert faces.images.shape == (6, g.resolution, g.resolution, 3) and faces.images.dtype == torch.uint8
    assert faces.ws.shape == (6, g.num_ws, g.w_dim) and faces.ws.dtype == torch.float32
    assert faces.labels == ["a smiling woman", "an old man"] and faces.n == 3


def test_same_seed_same_images_other_seed_other_images(pipe):
    a = pipe(["a smiling woman"], n=2, seed=5)
    b = pipe(["a smiling woman"], n=2, seed=5)
    c = pipe(["a smiling woman"], n=2, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.ws, b.ws)
    assert not torch.equal(a.ws, c.ws)


def test_samples_of_a_prompt_do_not_depend_on_later_prompts(pipe):
    one = pipe(["a smiling woman"], n=2, seed=1)
    two = pipe(["a smiling woman", "a child"], n=2, seed=1)
    assert torch.allclose(one.ws, two.ws[:2], atol=1e-6)
    assert not torch.allclose(two.ws[:2], two.ws[2:])  # the prompt changes the ws


def test_random_noise_is_per_image_and_seeded(pipe):
    from t2f.engine import TextToFace

    g = randomize(random_generator("tiny"))          # noise strengths != 0, so the noise shows
    noisy = TextToFace(g, pipe.clip, pipe.mapper, device="cpu", batch_size=2)
    a = noisy(["a", "b"], n=2, seed=3, noise_mode="random")
    b = noisy(["a", "b"], n=2, seed=3, noise_mode="random")
    c = noisy(["a"], n=1, seed=3, noise_mode="random")
    const = noisy(["a", "b"], n=2, seed=3, noise_mode="const")
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.images[:1], c.images)     # image (0, 0) does not depend on the others
    assert not torch.equal(a.images, const.images)


def test_random_noise_of_pipelines_on_two_threads_is_their_own(pipe):
    """t2f-serve runs one pipeline per model instance on threads of its own; torch's generators are process-wide."""
    import copy
    import threading

    g = randomize(random_generator("tiny"))          # noise strengths != 0, so the noise shows
    pipes = [TextToFace(copy.deepcopy(g), pipe.clip, pipe.mapper, device="cpu", batch_size=4) for _ in range(2)]
    calls = [dict(prompt=[f"face {k}"], n=4, seed=k, noise_mode="random") for k in range(4)]
    expected = [pipes[0](**call).images for call in calls]
    wrong = []

    def run(p):
        for _ in range(2):
            wrong.extend(k for k, call in enumerate(calls) if not torch.equal(p(**call).images, expected[k]))

    threads = [threading.Thread(target=run, args=(p,)) for p in pipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_truncation_zero_gives_the_average_w(pipe):
    faces = pipe(["a smiling woman", "a child"], n=2, truncation_psi=0.0)
    assert torch.allclose(faces.ws, pipe.generator.w_avg.expand_as(faces.ws), atol=1e-6)


def test_batch_size_does_not_change_results():
    a = tiny_pipeline(batch_size=1)(["a"], n=3, seed=2)
    b = tiny_pipeline(batch_size=8)(["a"], n=3, seed=2)
    assert torch.allclose(a.ws, b.ws, atol=1e-5)          # batching changes float rounding only
    assert (a.images.int() - b.images.int()).abs().max() <= 1


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(pipe):
    """Bit for bit (the graphs run on fixed-size blocks): alone, as t2f-infer's sample, and inside batches of other sizes."""
    pipe = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", batch_size=4)
    row = dict(prompt="a smiling woman", seed=5, sample=1, psi=0.7)

    def batch(others: list[tuple], at: int, **kwargs):
        rows = others[:at] + [tuple(row.values())] + others[at:]
        faces = pipe._generate_rows([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                                       prompts=[r[0] for r in rows], **kwargs)
        return faces.images[at], faces.ws[at]

    others = [("an old man", 1, 0, 1.0), ("a child", 2, 3, 0.5), ("a smiling woman", 9, 0, 0.7), ("a", 0, 0, 0.2), ("b", 3, 2, 0.9)]
    alone = batch([], 0)
    infer = pipe([row["prompt"]], n=row["sample"] + 1, seed=row["seed"], truncation_psi=row["psi"])     # t2f-infer --n 2
    results = [(infer.images[1], infer.ws[1]), batch(others[:2], 1), batch(others[:3], 3), batch(others, 4), batch(others, 0)]
    for images, ws in results:                       # batches of 1, 2, 3, 4 and 6 rows (a full block and a padded one)
        assert torch.equal(images, alone[0]) and torch.equal(ws, alone[1])
    random = [batch(others[:k], k, noise_mode="random") for k in (0, 2, 5)]     # text conditions in blocks, one noise stream each
    assert all(torch.equal(r[0], random[0][0]) and torch.equal(r[1], random[0][1]) for r in random)
    face = alone[0].numpy()                          # mode image: CLIP's image tower in blocks too
    faces = torch.stack([face_tensor(face), face_tensor(255 - face), face_tensor(face[::-1].copy())])
    one = pipe._generate_rows([4], [1], [0.7], images=faces[:1])
    three = pipe._generate_rows([1, 4, 4], [0, 1, 1], [1.0, 0.7, 0.7], images=faces[[1, 0, 2]])
    assert torch.equal(one.images[0], three.images[1]) and torch.equal(one.ws[0], three.ws[1])


def test_sample_z_is_prompt_major():
    z = sample_z(0, 3, 2, 4)
    assert z.shape == (6, 4) and torch.equal(sample_z(0, 1, 2, 4), z[:2])
    assert torch.equal(sample_z(0, 3, 1, 4), z[::2])  # fewer images per prompt: same first latents
    assert not torch.equal(sample_z(1, 3, 2, 4), z)


@pytest.mark.parametrize("prompts", [[], [""], ["  "], ["ok", "\t"]])
def test_bad_prompts(pipe, prompts):
    with pytest.raises(ValueError, match="non-empty"):
        pipe(prompts)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="finite"):
        pipe(["a"], truncation_psi=float("nan"))
    with pytest.raises(ValueError, match="n must be"):
        pipe(["a"], n=0)
    with pytest.raises(ValueError, match="noise_mode"):
        pipe(["a"], noise_mode="loud")


def test_fp16_needs_cuda(pipe):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", precision="fp16")


def test_incompatible_mapper(pipe):
    wrong = Mapper(MapperConfig(embed_dim=16, w_dim=pipe.generator.w_dim, num_ws=pipe.generator.num_ws))
    with pytest.raises(ValueError, match="16-d CLIP embeddings"):
        TextToFace(pipe.generator, pipe.clip, wrong, device="cpu")
    wrong = Mapper(MapperConfig(embed_dim=pipe.clip.embed_dim, w_dim=pipe.generator.w_dim, num_ws=3))
    with pytest.raises(ValueError, match="3 x 32 ws"):
        TextToFace(pipe.generator, pipe.clip, wrong, device="cpu")


def test_missing_mapper_says_how_to_get_one():
    with pytest.raises(MissingMapperError, match="--mapper RUN"):
        load_pipeline(generator="tiny", clip="tiny", mapper=None, device="cpu")


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_fp16_on_cuda_close_to_fp32():
    a = tiny_pipeline(device="cuda")(["a smiling woman"], n=2, seed=0)
    b = tiny_pipeline(device="cuda", precision="fp16")(["a smiling woman"], n=2, seed=0)
    assert (a.images.float() - b.images.float()).abs().mean() < 2.0


@pytest.mark.parametrize("backend", ["torch", "torch-compile", "onnxruntime"])
def test_a_pipeline_holds_the_models_only_where_its_backend_runs_them(backend, pipe, monkeypatch):
    """load_pipeline's models are freed once the backend is built, but for what the pipeline still runs: eager torch
    runs the generator and CLIP it was given; with its own copies (torch-compile) or exported graphs (onnxruntime) the
    pipeline keeps CLIP's tokenizer and image tower (mode "image") and neither the generator nor the text tower."""
    import gc
    import weakref

    import t2f.sources

    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime", reason='needs onnxruntime: pip install -e ".[export]"')
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)        # construction only here
    real, held = t2f.sources.load_models, {}

    def load_models(*args, **kwargs):
        generator, clip, mapper, resolved = real(*args, **kwargs)
        held.update(generator=weakref.ref(generator), text=weakref.ref(clip.model.transformer),
                    image=weakref.ref(clip.model.visual))
        return generator, clip, mapper, resolved

    monkeypatch.setattr(t2f.sources, "load_models", load_models)
    lean = load_pipeline("tiny", backend=backend, device="cpu", precision="fp32", batch_size=pipe.batch_size)
    gc.collect()
    runs_them = backend == "torch"
    assert (held["generator"]() is not None) == runs_them and (held["text"]() is not None) == runs_them
    assert (lean.generator is not None) == runs_them and held["image"]() is lean.clip.model.visual
    faces, image = lean(["a smiling woman"], n=2, seed=1), lean(mode="image", images=torch.zeros([1, 3, 32, 32]))
    assert (faces.images.int() - pipe(["a smiling woman"], n=2, seed=1).images.int()).abs().max() <= 1
    assert torch.allclose(image.ws, pipe(mode="image", images=torch.zeros([1, 3, 32, 32])).ws, atol=1e-5)
    if not runs_them:                                       # its CLIP cannot make another pipeline: one clear line
        with pytest.raises(ValueError, match="holds its image tower only .* pass the CLIP itself"):
            TextToFace(pipe.generator, lean.clip, pipe.mapper, device="cpu")


def test_torch_runs_the_callers_text_weights_in_fp32_on_their_device_and_leaves_them_as_they_are(pipe):
    """Eager fp32 on the CLIP's device holds its text tower once (the backend's graph runs the caller's tensors), gives
    what a copy gives bit for bit, and leaves the caller's modules in train mode with their requires_grad."""
    import copy

    from t2f.graphs import TextEncoderGraph

    clip = copy.deepcopy(pipe.clip)
    clip.model.train().requires_grad_(True)
    shared = TextToFace(pipe.generator, clip, pipe.mapper, device="cpu", batch_size=pipe.batch_size)
    assert shared.backend.runs_given_text_tower and shared.clip is clip
    caller = {id(t) for t in clip.model.parameters()}
    graph = shared.backend.text
    assert {id(t) for m in (graph.token_embedding, graph.resblocks, graph.ln_final) for t in m.parameters()} <= caller
    assert clip.model.training and clip.model.transformer.training and all(p.requires_grad for p in clip.model.parameters())
    tokens = clip.tokenize(["a smiling woman", "an old man"]).to(torch.int32)
    assert torch.equal(shared.backend.encode(tokens), TextEncoderGraph(clip).eval()(tokens))
    assert torch.equal(shared(["a smiling woman"], n=2, seed=1).images, pipe(["a smiling woman"], n=2, seed=1).images)
    assert all(p.requires_grad for p in clip.model.parameters()) and clip.model.training


def test_mode_image_copies_only_the_image_tower_to_another_device(pipe, monkeypatch):
    """The image tower placed on the pipeline's device for mode "image" is CLIP.only("image"): the text tower is not copied."""
    import t2f.devices

    copied = []
    real = t2f.devices.placed

    def placed(module, device):
        copied.append(module)
        return real(module, device)

    monkeypatch.setattr(t2f.devices, "placed", placed)
    fresh = TextToFace(pipe.generator, pipe.clip, pipe.mapper, device="cpu", batch_size=pipe.batch_size)
    copied.clear()
    fresh(mode="image", images=torch.zeros([1, 3, 32, 32]))
    assert copied and all("transformer" not in dict(m.model.named_children()) for m in copied if hasattr(m, "model"))


@pytest.mark.parametrize("call, message", [
    (dict(prompt=["a"], n=0), "n must be"),
    (dict(prompt=["a"], n=2.5), "n must be"),
    (dict(prompt=["a"], truncation_psi=float("inf")), "finite"),
    (dict(prompt=["a"], noise_mode="loud"), "noise_mode must be one of"),
    (dict(prompt=["a"], noise_mode="random", n=0), "n must be"),
    (dict(mode="image", images=[[0.0]]), "needs images as a tensor"),
    (dict(mode="image", images=torch.zeros([3, 32, 32])), r"float tensor \[rows, 3, H, W\].*\[3, 32, 32\]"),
    (dict(mode="image", images=torch.zeros([1, 4, 32, 32])), r"\[1, 4, 32, 32\]"),
    (dict(mode="image", images=torch.zeros([0, 3, 32, 32])), r"\[0, 3, 32, 32\]"),
    (dict(mode="image", images=torch.zeros([1, 3, 32, 32], dtype=torch.uint8)), "torch.uint8"),
    (dict(mode="image", images=torch.zeros([1, 3, 32, 32]), n=0), "n must be"),
])
def test_bad_options_and_images_are_one_line_before_any_model_runs(pipe, monkeypatch, call, message):
    from t2f.errors import UsageError

    def no_model(*args, **kwargs):
        raise AssertionError("a model ran")

    for name in ("encode", "map", "synthesize", "full"):
        monkeypatch.setattr(pipe.backend, name, no_model)
    monkeypatch.setattr(pipe.clip, "encode_image", no_model)
    monkeypatch.setattr(pipe, "_image_clip", None)
    monkeypatch.setattr(type(pipe.clip), "on", lambda self, device: no_model())
    with pytest.raises(UsageError, match=message):
        pipe(**call)


def test_a_noise_mode_the_backend_lacks_is_refused_before_clip_runs(pipe, monkeypatch):
    from t2f.errors import UsageError

    ran = []
    monkeypatch.setattr(pipe.backend, "noise_modes", ("const",))
    for name in ("encode", "map", "synthesize"):
        monkeypatch.setattr(pipe.backend, name, lambda *a, _name=name, **k: ran.append(_name))
    with pytest.raises(UsageError, match="noise mode random needs --backend torch"):
        pipe(["a smiling woman"], noise_mode="random")
    with pytest.raises(UsageError, match="noise mode none needs --backend torch"):
        pipe._generate_rows([0], [0], [1.0], images=torch.zeros([1, 3, 32, 32]), noise_mode="none")
    assert ran == []
