"""The Python API and the options every command shares: pipe(str | list), load_pipeline's defaults, PipelineConfig,
a run directory alone is a pipeline, and library calls leave the process's state alone."""

import dataclasses
import inspect
import json
import logging
import os

import click
import PIL.Image
import pytest
import torch

from helpers import assert_one_error_line, tiny_run
from t2f.config import FieldError
from t2f.engine import MissingMapperError, PipelineConfig, load_pipeline
from t2f.engine.bench import main as bench_main
from t2f.engine.cli import main as infer_main
from t2f.engine.serve import main as serve_main
from t2f.export.cli import main as export_main
from t2f.presets import DEFAULT_CLIP, DEFAULT_GENERATOR
from t2f.trainer.cli import main as train_main

CPU = dict(device="cpu", backend="torch", precision="fp32")
UNSET = getattr(click.core, "UNSET", None)          # click >= 8.2: an option's default when none is given


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as t2f-train writes it (its mapper records the tiny generator and CLIP, by fingerprint)."""
    return tiny_run(tmp_path_factory.mktemp("runs") / "run")


# ----------------------------------------------------------------------------
# pipe(prompt: str | list[str]).


def test_a_string_is_one_prompt(pipe):
    faces = pipe("a smiling woman", n=2, seed=3)
    assert faces.labels == ["a smiling woman"] and faces.images.shape[0] == 2 and faces.n == 2
    assert torch.equal(faces.images, pipe(["a smiling woman"], n=2, seed=3).images)


def test_a_list_gives_a_row_per_prompt(pipe):
    faces = pipe(["a", "b"], n=2)
    assert faces.images.shape[0] == 4 and faces.labels == ["a", "b"] and faces.n == 2
    assert torch.equal(faces.ws[:2], pipe("a", n=2).ws) and not torch.equal(faces.ws[:2], faces.ws[2:])


@pytest.mark.parametrize("bad,fragment", [
    ("", "the prompt is empty"),
    ("  \u200b ", "the prompt is empty"),
    ([], "got an empty list"),
    ((), "got an empty list"),
    (["a", " "], "prompt 1 of 2 is empty"),
    (["a", 3], "prompt 1 of 2 is not a string"),
    (None, "got None"),
    (b"a face", "got bytes"),
])
def test_an_empty_or_wrong_prompt_is_one_clear_error(pipe, bad, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        pipe(bad)
    assert "\n" not in str(error.value)


def test_image_mode_labels_its_rows_itself(pipe):
    images = torch.zeros([2, 3, 64, 64])
    assert pipe(mode="image", images=images).labels == ["image 0", "image 1"]
    with pytest.raises(ValueError, match="one label per image"):
        pipe(["only one"], mode="image", images=images)
    with pytest.raises(ValueError, match='images go with mode "image"'):
        pipe("a", images=images)


# ----------------------------------------------------------------------------
# load_pipeline: the mapper first, the commands' defaults.


def test_load_pipeline_and_t2f_infer_build_the_same_config_by_default(monkeypatch, tmp_path, run_cli):
    import t2f.engine.config as config_module

    params = inspect.signature(load_pipeline).parameters
    assert list(params)[0] == "mapper" and params["mapper"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in params.items() if name != "mapper")
    built = []

    def record(config, **kwargs):
        from t2f.errors import UsageError

        built.append(config)
        raise UsageError("recorded")                 # a user's error: t2f-infer shows it as one line

    monkeypatch.setattr(config_module, "build_pipeline", record)
    with pytest.raises(ValueError, match="recorded"):
        load_pipeline("tiny")
    assert_one_error_line(run_cli(infer_main, ["--mapper", "tiny", "a"], tmp_path), 1, "recorded")
    assert built[0] == built[1] == PipelineConfig(mapper="tiny")
    assert (built[0].generator, built[0].clip, built[0].backend, built[0].precision, built[0].device, built[0].batch_size) == \
           (None, None, "auto", None, "auto", None)        # the mapper's generator and CLIP; auto backend and precision


def test_load_pipeline_with_only_a_mapper_runs_what_auto_picks():
    from t2f.engine.backends import choose

    pipe = load_pipeline("tiny", device="cpu")
    cls, precision = choose(torch.device("cpu"))
    assert (pipe.backend.name, pipe.precision) == (cls.name, precision)
    assert (pipe.sources.generator, pipe.sources.clip) == ("tiny", "tiny")


def test_the_mapper_is_the_first_argument_and_the_rest_are_named():
    with pytest.raises(TypeError):
        load_pipeline("tiny", "tiny", "tiny")          # the old order (generator, clip, mapper) is refused, not misread
    with pytest.raises(MissingMapperError, match="t2f-train --generator tiny --clip tiny"):
        load_pipeline(generator="tiny", clip="tiny", device="cpu")
    with pytest.raises(MissingMapperError, match=f"--generator {DEFAULT_GENERATOR} --clip {DEFAULT_CLIP}"):
        load_pipeline()


@pytest.mark.parametrize("kwargs,field,fragment", [
    (dict(backend="nope"), "backend", "unknown backend 'nope'"),
    (dict(precision="fp64"), "precision", "precision must be one of fp32, fp16, bf16"),
    (dict(precision="fp16", device="cpu"), "precision", "fp16 needs a CUDA device"),
    (dict(device="tpu"), "device", "unknown device"),
    (dict(batch_size=0), "batch_size", "positive integer"),
    (dict(batch_size=2.0), "batch_size", "positive integer"),
    (dict(mapper=""), "mapper", "non-empty"),
    (dict(mapper="hf-hub:no-org"), "mapper", "is not a Hub id"),
    (dict(clip=3), "clip", "non-empty string"),
    (dict(artifacts=" "), "artifacts", "non-empty path"),
])
def test_pipeline_config_refuses_bad_values_by_field(kwargs, field, fragment):
    with pytest.raises(FieldError, match=fragment) as error:
        PipelineConfig(**kwargs)
    assert error.value.field == field


def test_pipeline_config_is_frozen_and_normal(tmp_path):
    config = PipelineConfig(mapper=tmp_path, precision="fp32", device=torch.device("cpu"))
    assert config.mapper == str(tmp_path) and config.precision == "fp32" and config.device == "cpu"
    assert config.models.mapper == str(tmp_path) and config.models.generator is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backend = "torch"


# ----------------------------------------------------------------------------
# One option group, one set of default names.


def _params(command) -> dict:
    return {p.name: p for p in command.params}


def test_every_command_takes_the_same_model_options():
    commands = dict(infer=infer_main, serve=serve_main, bench=bench_main, export=export_main)
    for name, command in commands.items():
        params = _params(command)
        for option in ("mapper", "generator", "clip", "cache"):
            assert params[option].help == _params(infer_main)[option].help, (name, option)
        assert params["generator"].default in (None, UNSET) and params["clip"].default in (None, UNSET), name
        assert "the one the mapper was trained for" in params["generator"].help
    for command in (infer_main, serve_main):
        assert {"backend", "precision", "batch", "device", "artifacts"} <= set(_params(command))
    assert _params(serve_main)["device"].multiple and not _params(infer_main)["device"].multiple
    assert _params(bench_main)["mapper"].default == "tiny" and _params(infer_main)["mapper"].default is None


@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_mapper_that_is_not_a_directory_is_one_usage_error_in_every_command(what, tmp_path, run_cli):
    """One check of a mapper path, made where the mapper is used (t2f.sources): exit 2 on --mapper, the same line from
    every command, and nothing written; the library raises it as a FieldError on "mapper"."""
    (tmp_path / "file").write_text("not a mapper")
    mapper = str(tmp_path / what)
    commands = [(infer_main, ["a"]), (export_main, ["--out", "o", "--onnx-only"]), (bench_main, ["--batches", "1"]),
                (serve_main, ["--device", "cpu"])]
    lines = {assert_one_error_line(run_cli(command, ["--mapper", mapper, *args], tmp_path), 2, "Invalid value for --mapper:",
                                   f"{mapper} is not a mapper directory") for command, args in commands}
    assert len(lines) == 1, lines
    assert os.listdir(tmp_path) == ["file"]
    with pytest.raises(FieldError, match="is not a mapper directory") as error:
        load_pipeline(mapper, **CPU)
    assert error.value.field == "mapper"


def test_the_default_model_names_are_defined_once():
    import t2f.clip

    params = _params(train_main)
    assert (params["generator"].default, params["clip"].default) == (DEFAULT_GENERATOR, DEFAULT_CLIP)
    assert t2f.clip.DEFAULT_CLIP is DEFAULT_CLIP


# ----------------------------------------------------------------------------
# A run directory alone.


def test_infer_with_a_run_directory_alone(run, tmp_path, run_cli):
    """T2F_OFFLINE=1 (conftest): the recorded tiny generator and CLIP load, nothing is fetched."""
    assert os.environ["T2F_OFFLINE"] == "1"
    result = run_cli(infer_main, ["--mapper", run, "a smiling woman", "--n", 2, "--backend", "torch", "--out", "alone.png"], tmp_path, expect=0)
    info = json.loads(PIL.Image.open(tmp_path / "alone.png").text["t2f"])
    assert (info["generator"], info["clip"], info["mapper"]) == ("tiny", "tiny", str(run))
    run_cli(infer_main, ["--mapper", run, "--generator", "tiny", "--clip", "tiny", "a smiling woman", "--n", 2, "--backend", "torch",
                         "--out", "given.png"], tmp_path, expect=0)
    assert (tmp_path / "alone.png").read_bytes() == (tmp_path / "given.png").read_bytes()
    assert "random weights (--generator tiny)" in result.stderr and "--mapper" not in result.stderr   # the run is trained


def test_a_mismatching_clip_is_one_line(run, tmp_path, run_cli):
    result = run_cli(infer_main, ["--mapper", run, "--clip", "ViT-B-32:random", "a"], tmp_path)
    assert_one_error_line(result, 1, f"{run} was trained for CLIP tiny", "pass --clip tiny")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("record,fragments", [
    (dict(generator=dict(name="/nowhere/ffhq.pkl", fingerprint="0" * 16)), ["generator /nowhere/ffhq.pkl", "not on this machine", "--generator"]),
    (dict(clip=dict(name="ViT-B-32:open_clip_model.safetensors", fingerprint="0" * 16)),
     ["checkpoint open_clip_model.safetensors", "not on this machine", "--clip ViT-B-32:/path/to/open_clip_model.safetensors"]),
    (dict(generator=None), ["records no generator", "--generator"]),
])
def test_a_recorded_model_missing_here_is_one_line(tmp_path, run_cli, record, fragments):
    run = tiny_run(tmp_path / "run", **record)
    result = run_cli(infer_main, ["--mapper", run, "a"], tmp_path)
    assert_one_error_line(result, 1, *fragments)


def test_a_local_run_gives_its_checkpoint_clip_full_path(tmp_path, tiny_clip):
    """A run trained with --clip MODEL:/path records the file's name; its options.json has the path, which loads."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "clip.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(checkpoint))
    run = tiny_run(tmp_path / "run", clip_name="t2f-tiny:clip.safetensors")
    options = dict(kind="t2f-train-run", synth=dict(identity=dict(clip_fingerprint=tiny_clip.fingerprint), clip_spec=f"t2f-tiny:{checkpoint}"))
    (run / "options.json").write_text(json.dumps(options))
    pipe = load_pipeline(run, **CPU)
    assert pipe.sources.clip == f"t2f-tiny:{checkpoint}" and pipe.clip.fingerprint == tiny_clip.fingerprint


def test_serve_writes_a_repository_for_a_run_alone(run, tmp_path, run_cli):
    run_cli(serve_main, ["--mapper", run, "--device", "cpu", "--write-repository", "repo"], tmp_path, expect=0)
    text = (tmp_path / "repo" / "t2f" / "config.pbtxt").read_text()
    parameters = json.loads(json.loads(text.split("string_value: ", 1)[1].rsplit(" }", 2)[0]))
    assert parameters["mapper"] == str(run) and "generator" not in parameters and "clip" not in parameters
    parameters.pop("threads", None)                  # the instance's own (engine/triton_model.py), the rest is load_pipeline's
    assert load_pipeline(device="cpu", progress=False, **parameters).sources.generator == "tiny"


@pytest.mark.slow
def test_bench_and_export_take_a_run_alone(run, tmp_path, run_cli):
    result = run_cli(bench_main, ["--mapper", run, "--backends", "torch", "--batches", "1", "--warmup", 0, "--iters", 1,
                                  "--device", "cpu", "--json", "bench.json"], tmp_path, expect=0)
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["generator"] == "tiny", result.output
    run_cli(export_main, ["--mapper", run, "--out", "engines", "--onnx-only"], tmp_path, expect=0)
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert manifest["models"]["generator"]["name"] == "tiny" and manifest["models"]["mapper"]["source"] == str(run)


# ----------------------------------------------------------------------------
# Process-wide state.


def test_offline_clip_loads_leave_the_environment_and_huggingface_hub_alone(monkeypatch, no_network):
    from huggingface_hub import constants

    from t2f.clip import ClipLoadError, load_clip

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ClipLoadError, match="not cached"):
        load_clip("ViT-B-32:openai")                 # T2F_OFFLINE=1: the Hub is not asked (no socket was opened)
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False and no_network == []


def test_user_errors_put_the_logging_level_back():
    from t2f.cli import user_errors

    logging.disable(logging.WARNING)
    try:
        with user_errors():
            assert logging.root.manager.disable == logging.ERROR
        assert logging.root.manager.disable == logging.WARNING
    finally:
        logging.disable(logging.NOTSET)
