"""t2f-train on the tiny generator and tiny CLIP: quality bar through the defaults, report, resumption, bad input, torchrun."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from t2f.bank import load_bank, save_bank
from t2f.engine.cli import main as infer_main
from t2f.presets import random_generator
from t2f.trainer import FitOptions, SynthOptions, TrainConfig
from t2f.trainer.cli import main as train_main
from t2f.trainer.config import PRESET_BUDGETS
from t2f.trainer.report import PROMPTS
from t2f.weights import save_generator

from helpers import invoke, randomize

BASE = ["--generator", "tiny", "--clip", "tiny", "--no-progress"]
# Short fits for the mechanics (resumption, layout, errors): the default options, fewer steps.
FIT = ["--log-every", "250", "--eval-every", "1000", "--checkpoint-every", "500"]


def train(args, expect=0):
    return invoke(train_main, args, expect)


def evals(run):
    return [e for e in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if "w_error" in e]


def without_timing(stats_text):
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_s"} for line in stats_text.splitlines()]


@pytest.fixture(scope="module")
def trained_with_output(tmp_path_factory):
    """One straight `t2f-train` run, all three stages, with every default (the tiny preset's budget), and its output.

    Minutes on a CPU: every test that uses it is marked slow."""
    run = tmp_path_factory.mktemp("runs") / "full"
    return run, train([*BASE, "--out", run]).output


@pytest.fixture(scope="module")
def trained(trained_with_output):
    return trained_with_output[0]


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    """A small synth stage (4 shards) to copy for fit experiments."""
    run = tmp_path_factory.mktemp("runs") / "small"
    train(["synth", *BASE, "--out", run, "--samples", 1200, "--shard-size", 300, "--synth-batch", 100])
    return run


# ----------------------------------------------------------------------------
# Quality and outputs.


@pytest.mark.slow
def test_defaults_use_the_text_and_z(trained_with_output):
    run, output = trained_with_output
    budget = PRESET_BUDGETS["tiny"]
    history = evals(run)
    last = history[-1]
    assert [e["step"] for e in history] == list(range(budget["eval_every"], budget["steps"] + 1, budget["eval_every"]))
    # The quality bar, through the defaults: the embedding alone predicts w at half the mean baseline's error or better.
    assert last["w_error"] <= 0.5 * last["w_error_mean_baseline"], last
    assert last["w_explained"] == pytest.approx(1 - last["w_error"] / last["w_error_mean_baseline"])
    assert history[0]["w_explained"] < last["w_explained"]
    # ... while z still spreads the faces of one embedding.
    assert 0.02 < last["z_spread"] < 1, last
    assert "warning" not in last and "warning" not in output
    assert f"explains {last['w_explained']:.0%} of w's variance" in output
    # The other metrics are there and sane.
    assert 0 < last["clip_consistency"] <= last["clip_consistency_ceiling"] + 1e-6
    assert abs(last["clip_consistency_ceiling"] - 1) < 1e-4   # G(w) re-embedded gives back e
    assert 0 < last["w_error_posterior"]


@pytest.mark.slow
def test_run_layout(trained):
    names = set(os.listdir(trained))
    assert {"options.json", "pairs", "checkpoint.pt", "stats.jsonl", "config.json", "model.safetensors", "bank.safetensors",
            "grids", "report.html"} <= names
    options = json.loads((trained / "options.json").read_text())
    assert set(options) == {"kind", "synth", "fit", "bank"}
    assert options["synth"]["identity"]["samples"] == PRESET_BUDGETS["tiny"]["samples"]
    assert options["fit"]["identity"]["steps"] == PRESET_BUDGETS["tiny"]["steps"]
    assert options["kind"] == "t2f-train-run" and options["synth"]["clip_spec"] == "tiny"
    config = json.loads((trained / "config.json").read_text())
    assert config["kind"] == "t2f-mapper" and config["generator"]["name"] == "tiny" and config["clip"]["name"] == "tiny"
    manifest = json.loads((trained / "pairs" / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == PRESET_BUDGETS["tiny"]["samples"]
    assert load_bank(trained / "bank.safetensors").embeddings.shape == (PRESET_BUDGETS["tiny"]["samples"], 128)


@pytest.mark.slow
def test_report_shows_curves_and_a_grid_per_evaluation(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    steps = [e["step"] for e in evals(run)]
    grids = sorted(os.listdir(run / "grids"))
    assert grids == ["rows.json"] + [f"step-{s:07d}.png" for s in steps]
    layout = json.loads((run / "grids" / "rows.json").read_text())
    assert [r["label"] for r in layout["rows"][:len(PROMPTS)]] == list(PROMPTS) and len(layout["rows"]) == len(PROMPTS) + 4
    grid = np.asarray(PIL.Image.open(run / "grids" / grids[-1]))
    assert grid.shape == (len(layout["rows"]) * 64, len(layout["columns"]) * 64, 3)
    assert (grid[:64 * len(PROMPTS), :64] == 255).all() and grid[-64:, :64].std() > 0   # blank, then a held-out truth
    assert grid[:64, 64:128].std() > 0 and not np.array_equal(grid[:64, 64:], grid[64:128, 64:])   # rows differ

    (run / "report.html").unlink()
    assert "report.html" in train(["report", "--out", run]).output
    page = (run / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2 + len(steps)   # two plots, one grid per evaluation
    assert "http://" not in page and "https://" not in page                 # self-contained
    for s in steps:
        assert f"faces at step {s}" in page
    assert "w_explained" in page and "z_spread" in page and "class='warning'" not in page and "class='ok'" in page
    for label in PROMPTS:
        assert label in page
    # The embedded plots are real PNGs.
    import base64
    import io
    first = page.split("src='data:image/png;base64,")[1].split("'")[0]
    assert PIL.Image.open(io.BytesIO(base64.b64decode(first))).size[0] > 300


@pytest.mark.parametrize("case,fragment", [("missing", "does not exist"), ("file", "is not a directory"),
                                           ("empty", "no training statistics yet"), ("no-fit", "no training statistics yet"),
                                           ("foreign", "not a t2f-train run")])
def test_report_bad_input_is_one_line(small_pairs, tmp_path, case, fragment):
    run = tmp_path / "run"
    if case == "file":
        run.write_text("x")
    elif case == "empty":
        run.mkdir()
    elif case == "no-fit":
        shutil.copytree(small_pairs, run)
    elif case == "foreign":
        run.mkdir()
        (run / "options.json").write_text(json.dumps({"learning_rate": 3}))
        (run / "stats.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    result = train(["report", "--out", run], expect=1)
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "report.html").exists()


def test_a_fit_that_ignores_the_text_ends_with_a_warning(small_pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    result = train(["fit", "--out", run, "--no-progress", "--steps", 10, "--eval-every", 10])
    last = evals(run)[-1]
    assert last["w_explained"] < 0.25 and "embedding explains only" in last["warning"]
    assert last["warning"] in result.output
    assert last["warning"] in (run / "report.html").read_text().replace("&#x27;", "'")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["text", "knn", "image"])
def test_infer_with_the_trained_mapper(trained, tmp_path, mode, run_cli):
    args = ["--generator", "tiny", "--clip", "tiny", "--mapper", trained, "--mode", mode, "--n", 3, "--save-ws", "ws.npy"]
    if mode == "image":
        face = np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8)
        PIL.Image.fromarray(face).save(tmp_path / "face.png")
        args += ["--image", "face.png", "--image", "face.png"]
    else:
        args += ["a smiling woman", "an old man"]
    result = run_cli(infer_main, args, tmp_path, expect=0)
    assert f"mode {mode}" in result.stdout
    ws = np.load(tmp_path / "ws.npy")
    assert ws.shape == (6, 10, 32)
    assert PIL.Image.open(tmp_path / "faces.png").size == (3 * 64, 2 * 64)
    assert not np.allclose(ws[0], ws[1])   # samples of one row differ


@pytest.mark.slow
def test_knn_and_text_modes_differ(trained, tmp_path, run_cli):
    for mode in ("text", "knn"):
        run_cli(infer_main, ["--generator", "tiny", "--clip", "tiny", "--mapper", trained, "--mode", mode, "a child", "--n", 2,
                             "--save-ws", f"{mode}.npy"], tmp_path, expect=0)
    assert not np.allclose(np.load(tmp_path / "text.npy"), np.load(tmp_path / "knn.npy"))


# ----------------------------------------------------------------------------
# Resumption.


def test_synth_interrupted_and_resumed_equals_straight(small_pairs, tmp_path):
    run = tmp_path / "resumed"
    args = ["synth", *BASE, "--out", run, "--samples", 1200, "--shard-size", 300, "--synth-batch", 100]
    result = train([*args, "--max-shards", 1])
    assert "resume" in result.output and not (run / "pairs" / "manifest.json").exists()
    assert sorted(os.listdir(run / "pairs")) == ["shard-00000.safetensors"]
    before = (run / "pairs" / "shard-00000.safetensors").stat().st_mtime_ns
    (run / "pairs" / ".shard-00001.safetensors.abc.tmp").write_bytes(b"partial")   # as a killed run leaves it
    train(args)
    assert (run / "pairs" / "shard-00000.safetensors").stat().st_mtime_ns == before   # not redone
    assert sorted(os.listdir(run / "pairs")) == sorted(os.listdir(small_pairs / "pairs"))
    for name in os.listdir(small_pairs / "pairs"):
        if name.endswith(".safetensors"):
            a, b = load_file(str(run / "pairs" / name)), load_file(str(small_pairs / "pairs" / name))
            assert all(torch.equal(a[k], b[k]) for k in ("w", "embedding", "index"))


@pytest.mark.slow
def test_fit_interrupted_and_resumed_equals_straight(small_pairs, tmp_path):
    fit = ["fit", "--out", None, "--no-progress", *FIT, "--steps", 300, "--checkpoint-every", 100, "--log-every", 50, "--eval-every", 150]
    runs = {}
    for name in ("straight", "resumed"):
        runs[name] = tmp_path / name
        shutil.copytree(small_pairs, runs[name])
        fit[2] = runs[name]
        if name == "resumed":
            result = train([*fit, "--stop-after", 130])
            assert "stopped at step 130" in result.output and not (runs[name] / "model.safetensors").exists()
            with open(runs[name] / "stats.jsonl", "a") as f:   # a line logged after the checkpoint, then killed
                f.write(json.dumps({"step": 131, "loss": 0.0}) + "\n")
            (runs[name] / "grids" / "step-0000150.png").write_bytes(b"stale")   # a grid from after the checkpoint
        train(fit)
    a, b = (load_file(str(runs[n] / "model.safetensors")) for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing((runs["straight"] / "stats.jsonl").read_text()) == without_timing((runs["resumed"] / "stats.jsonl").read_text())
    assert sorted(os.listdir(runs["resumed"] / "grids")) == ["rows.json", "step-0000150.png", "step-0000300.png"]
    for name in ("step-0000150.png", "step-0000300.png"):
        assert (runs["straight"] / "grids" / name).read_bytes() == (runs["resumed"] / "grids" / name).read_bytes()


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("args", [["--samples", 0], ["--shard-size", -1], ["--steps", 0], ["--batch", 0],
                                  ["--embed-noise", "1:0"], ["--val-fraction", 0]])
def test_bad_sizes(tmp_path, args):
    result = train([*BASE, "--out", tmp_path / "run", *args], expect=2)
    assert "Error" in result.output and not (tmp_path / "run").exists()


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path):
    result = train([*BASE, "--out", tmp_path / "run", "--samples", 10, "--embed-noise", "0.5:1", "--synth-batch", 4,
                    "--seed", 3, "--stop-after", 7, "--dry-run"])
    printed = json.loads(result.output)
    budget = PRESET_BUDGETS["tiny"]
    # Exactly the TrainConfig that train() would get: each option in its section, the tiny preset's budget for the rest.
    expected = TrainConfig(generator="tiny", clip="tiny", progress=False, stop_after=7,
                           synth=SynthOptions(samples=10, batch=4, seed=3),
                           fit=FitOptions(steps=budget["steps"], eval_every=budget["eval_every"], noise_min=0.5, noise_max=1.0, seed=3))
    assert printed == dict(stages=["synth", "fit", "bank"], out=str(tmp_path / "run"), config=expected.to_dict())
    assert printed["config"]["fit"]["lr"] == 1e-2 and printed["config"]["fit"]["noise_share"] == 0.5   # the defaults, spelt out
    assert not (tmp_path / "run").exists()
    # A stage prints its own section only.
    fit_only = json.loads(train(["fit", "--out", tmp_path / "run", "--dry-run"]).output)
    assert fit_only["stages"] == ["fit"] and {"synth", "bank"}.isdisjoint(fit_only["config"])
    assert fit_only["config"]["generator"] is None          # as the run's synth recorded it


@pytest.mark.parametrize("generator,samples,steps", [("tiny", PRESET_BUDGETS["tiny"]["samples"], PRESET_BUDGETS["tiny"]["steps"]),
                                                     ("ffhq-1024", 100_000, 20_000)])
def test_presets_have_their_own_budget(tmp_path, generator, samples, steps):
    config = json.loads(train(["--generator", generator, "--out", tmp_path / "run", "--dry-run"]).output)["config"]
    assert (config["synth"]["samples"], config["fit"]["steps"]) == (samples, steps)
    explicit = json.loads(train(["--generator", generator, "--out", tmp_path / "run", "--dry-run", "--samples", 7, "--steps", 9]).output)
    assert (explicit["config"]["synth"]["samples"], explicit["config"]["fit"]["steps"]) == (7, 9)


def test_fit_takes_the_budget_of_the_runs_generator(small_pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    config = json.loads(train(["fit", "--out", run, "--dry-run"]).output)["config"]
    assert config["fit"]["steps"] == PRESET_BUDGETS["tiny"]["steps"]
    assert json.loads(train(["fit", "--out", tmp_path / "new", "--dry-run"]).output)["config"]["fit"]["steps"] == 20_000


def test_a_directory_holding_a_different_run_is_refused(small_pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    before = (run / "options.json").read_text()
    result = train(["synth", *BASE, "--out", run, "--samples", 1200, "--shard-size", 300, "--seed", 1], expect=1)
    assert "holds a different run" in result.output and "seed" in result.output
    assert (run / "options.json").read_text() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = train(["synth", *BASE, "--out", other, "--samples", 10], expect=1)
    assert "holds no t2f-train run" in result.output and os.listdir(other) == ["notes.txt"]


def test_options_before_the_subcommand_are_refused(tmp_path):
    result = CliRunner().invoke(train_main, ["--steps", "5", "fit", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "must come after the subcommand" in result.output


@pytest.mark.parametrize("damage", ["missing", "empty", "corrupt"])
def test_bad_shards(small_pairs, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    shard = run / "pairs" / "shard-00002.safetensors"
    if damage == "missing":
        shard.unlink()
        fragment = "missing"
    elif damage == "empty":
        manifest = json.loads((run / "pairs" / "manifest.json").read_text())
        manifest["shards"] = []
        (run / "pairs" / "manifest.json").write_text(json.dumps(manifest))
        fragment = "lists no shards"
    else:
        shard.write_bytes(shard.read_bytes()[:100])
        fragment = "truncated or corrupt"
    result = train(["fit", "--out", run, "--no-progress", *FIT, "--steps", 10], expect=1)
    assert fragment in result.output and not (run / "model.safetensors").exists()


def test_fit_without_synth(tmp_path):
    result = train(["fit", "--out", tmp_path / "run", "--steps", 10], expect=1)
    assert "no synth stage" in result.output


@pytest.mark.slow
def test_mapper_refuses_other_generator_weights(trained, tmp_path, run_cli):
    save_generator(randomize(random_generator("tiny"), seed=9), tmp_path / "other-g")
    result = run_cli(infer_main, ["--generator", "other-g", "--clip", "tiny", "--mapper", trained, "a"], tmp_path, expect=1)
    assert "trained for generator tiny" in result.stderr and not (tmp_path / "faces.png").exists()


@pytest.mark.slow
def test_mapper_refuses_other_clip_weights(trained, tmp_path, run_cli):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = json.loads((run / "config.json").read_text())
    config["clip"] = {"name": "ViT-B-32:openai", "fingerprint": "0123456789abcdef"}
    (run / "config.json").write_text(json.dumps(config))
    result = run_cli(infer_main, ["--generator", "tiny", "--clip", "tiny", "--mapper", run, "a"], tmp_path, expect=1)
    assert "trained for CLIP ViT-B-32:openai" in result.stderr


@pytest.mark.slow
def test_bank_for_another_clip_is_refused(trained, tmp_path, run_cli):
    bank = load_bank(trained / "bank.safetensors")
    save_bank(tmp_path / "bank.safetensors", bank.embeddings, "ViT-B-32:openai", "0123456789abcdef")
    result = run_cli(infer_main, ["--generator", "tiny", "--clip", "tiny", "--mapper", trained, "--mode", "knn",
                                  "--bank", "bank.safetensors", "a"], tmp_path, expect=1)
    assert "bank was made with CLIP ViT-B-32:openai" in result.stderr and not (tmp_path / "faces.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args,fragment", [
    (["--mode", "image"], "needs --image"),
    (["--mode", "image", "--image", "x.png", "a"], "takes no prompts"),
    (["--image", "x.png", "a"], "goes with --mode image"),
    (["--mode", "image", "--image", "missing.png"], "cannot read image"),
    ([], "at least one prompt"),
])
def test_mode_usage_errors(trained, tmp_path, args, fragment, run_cli):
    (tmp_path / "x.png").write_bytes(b"not a png")
    result = run_cli(infer_main, ["--generator", "tiny", "--clip", "tiny", "--mapper", trained, *args], tmp_path, expect=2)
    assert fragment in result.stderr


# ----------------------------------------------------------------------------
# torchrun.


@pytest.mark.slow
def test_torchrun_two_processes_same_layout_and_pairs(small_pairs, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "t2f.trainer.cli",
           *BASE, "--out", str(run), "--samples", "1200", "--shard-size", "300", "--synth-batch", "100",
           *[str(a) for a in FIT], "--steps", "60", "--log-every", "30", "--eval-every", "60"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"options.json", "pairs", "checkpoint.pt", "stats.jsonl", "config.json", "model.safetensors", "bank.safetensors"} <= set(os.listdir(run))
    for name in os.listdir(small_pairs / "pairs"):   # the ranks split the shards; each shard is as one process makes it
        if name.endswith(".safetensors"):
            a, b = load_file(str(run / "pairs" / name)), load_file(str(small_pairs / "pairs" / name))
            assert torch.equal(a["w"], b["w"]) and torch.allclose(a["embedding"], b["embedding"], atol=1e-6)
    assert [e["step"] for e in map(json.loads, (run / "stats.jsonl").read_text().splitlines())] == [30, 60]


# ----------------------------------------------------------------------------
# Found in review: recovery paths and odd inputs.


def test_a_failed_fit_does_not_lock_its_options(small_pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    manifest = (run / "pairs" / "manifest.json").read_bytes()
    (run / "pairs" / "manifest.json").unlink()              # as if synth had not finished
    result = train(["fit", "--out", run, "--no-progress", *FIT, "--steps", 10], expect=1)
    assert "no complete set of pairs" in result.output
    (run / "pairs" / "manifest.json").write_bytes(manifest)
    train(["fit", "--out", run, "--no-progress", *FIT, "--steps", 20, "--stop-after", 5])
    # Once a checkpoint exists, other weight-changing options are refused.
    result = train(["fit", "--out", run, "--no-progress", *FIT, "--steps", 30], expect=1)
    assert "fit steps was 20, now 30" in result.output


@pytest.mark.slow
def test_stop_after_counts_steps_of_this_run(small_pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    args = ["fit", "--out", run, "--no-progress", *FIT, "--steps", 30, "--stop-after", 12]
    assert "stopped at step 12 of 30" in train(args).output
    assert "stopped at step 24 of 30" in train(args).output
    assert "stopped" not in train(args).output and (run / "model.safetensors").exists()


@pytest.mark.slow
def test_a_torn_stats_line_does_not_block_resuming(small_pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    args = ["fit", "--out", run, "--no-progress", *FIT, "--steps", 20, "--log-every", 5, "--checkpoint-every", 10]
    train([*args, "--stop-after", 10])
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"step": 15, "loss": 0.')                    # killed mid-write
    train(args)
    assert [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()] == [5, 10, 15, 20]


@pytest.mark.parametrize("damage,fragment", [
    ("checkpoint", "checkpoint.pt is corrupt"),
    ("manifest", "manifest.json is malformed"),
    ("options", "not a t2f-train run"),
])
def test_damaged_run_files_give_one_line(small_pairs, tmp_path, damage, fragment):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    if damage == "checkpoint":
        (run / "checkpoint.pt").write_bytes(os.urandom(256))
    elif damage == "manifest":
        (run / "pairs" / "manifest.json").write_text(json.dumps({"shards": "all of them"}))
    else:
        (run / "options.json").write_text("[]")
    result = train(["fit", "--out", run, "--no-progress", *FIT, "--steps", 10], expect=1)
    assert fragment in result.output and "Traceback" not in result.output


def test_another_tools_options_json_is_not_a_run(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "options.json").write_text(json.dumps({"learning_rate": 3}))
    result = train(["synth", *BASE, "--out", other, "--samples", 10], expect=1)
    assert "not a t2f-train run" in result.output
    assert os.listdir(other) == ["options.json"] and json.loads((other / "options.json").read_text()) == {"learning_rate": 3}


def test_leftover_temporary_files_do_not_make_a_new_run_foreign(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".options.json.abc.tmp").write_text("{")           # killed during the first write
    train(["synth", *BASE, "--out", run, "--samples", 20, "--shard-size", 10, "--synth-batch", 10])
    assert (run / "pairs" / "manifest.json").exists()


def test_out_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = train(["synth", *BASE, "--out", tmp_path / "file" / "run", "--samples", 10], expect=1)
    assert "Error" in result.output and "Traceback" not in result.output


def test_clip_fingerprint_sees_every_weight_and_the_architecture(tiny_clip):
    from t2f.clip import load_clip

    other = load_clip("tiny")
    assert other.fingerprint == tiny_clip.fingerprint
    with torch.no_grad():
        other.model.transformer.resblocks[0].mlp.c_fc.weight.add_(0.01)   # not an embedding or projection
    other._fingerprint = None
    assert other.fingerprint != tiny_clip.fingerprint
    quick = load_clip("tiny")
    from open_clip.transformer import QuickGELU
    quick.model.transformer.resblocks[0].mlp.gelu = QuickGELU()
    quick._fingerprint = None
    assert quick.fingerprint != tiny_clip.fingerprint


@pytest.mark.gpu
def test_fit_resumes_on_cuda(small_pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pairs, run)
    args = ["fit", "--out", run, "--no-progress", *FIT, "--steps", 20, "--device", "cuda"]
    train([*args, "--stop-after", 10])
    train(args)
    assert (run / "model.safetensors").exists()


@pytest.mark.slow
def test_malformed_mapper_record(trained, tmp_path, run_cli):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = json.loads((run / "config.json").read_text())
    config["clip"] = "tiny"
    (run / "config.json").write_text(json.dumps(config))
    result = run_cli(infer_main, ["--generator", "tiny", "--clip", "tiny", "--mapper", run, "a"], tmp_path, expect=1)
    assert "malformed generator or clip record" in result.stderr
