"""`t2f-infer` and `t2f-convert`: outputs, and one clear error line with nothing written for bad input."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from t2f.export.convert import main as convert_main
from t2f.engine.cli import main as infer_main
from t2f.weights import save_generator

from helpers import TINY, assert_one_error_line, write_nvidia_pickle


@pytest.mark.slow
def test_infer_writes_grid_images_and_ws(tmp_path, run_cli):
    result = run_cli(infer_main, [*TINY, "a smiling woman", "an old man", "--n", "3", "--out", "grid.png",
                                  "--save-images", "each", "--save-ws", "ws.npy"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "random weights" in result.stderr and "wrote grid.png" in result.stdout
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 64, 2 * 64)
    assert json.loads(grid.text["t2f"])["labels"] == ["a smiling woman", "an old man"]
    assert sorted(os.listdir(tmp_path / "each")) == [f"p{p:03d}_s{s:03d}.png" for p in range(2) for s in range(3)]
    single = np.asarray(PIL.Image.open(tmp_path / "each" / "p001_s002.png"))
    assert np.array_equal(single, np.asarray(grid)[64:128, 128:192])
    assert np.load(tmp_path / "ws.npy").shape == (6, 10, 32)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


@pytest.mark.slow
def test_infer_is_deterministic(tmp_path, run_cli):
    for name in ("a.png", "b.png"):
        assert run_cli(infer_main, [*TINY, "a child", "--n", "2", "--seed", "7", "--out", name], tmp_path).exit_code == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "a.png")), np.asarray(PIL.Image.open(tmp_path / "b.png")))


@pytest.mark.slow
def test_long_prompt_warns_in_one_line(tmp_path, run_cli):
    result = run_cli(infer_main, [*TINY, " ".join(["face"] * 40), "--n", "1"], tmp_path)
    assert result.exit_code == 0
    assert sum(line.startswith("warning: prompt truncated") for line in result.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,fragment", [
    (["   "], "empty"),
    (["ok", ""], "empty"),
    (["a", "--n", "0"], "--n"),
    (["a", "--n", "100000"], "--n"),
    (["a", "b", "c", "d", "e", "--n", "64"], "more than 256 images"),
    (["a", "--truncation", "nan"], "finite"),
    (["a", "--truncation", "inf"], "--truncation"),
    (["a", "--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["a", "--device", "tpu"], "--device"),
])
def test_usage_errors(tmp_path, args, fragment, run_cli):
    result = run_cli(infer_main, [*TINY, *args], tmp_path)
    assert_one_error_line(result, 2, fragment)
    assert os.listdir(tmp_path) == []


def test_missing_generator_file(tmp_path, run_cli):
    result = run_cli(infer_main, ["--generator", "missing.pkl", "--clip", "tiny", "--mapper", "tiny", "a"], tmp_path)
    assert_one_error_line(result, 1, "missing.pkl", "no such file")
    assert os.listdir(tmp_path) == []


def test_offline_preset_names_file_url_and_flag(tmp_path, run_cli):
    result = run_cli(infer_main, ["--generator", "ffhq-1024", "--clip", "tiny", "--mapper", "tiny", "a"], tmp_path)
    assert_one_error_line(result, 1, "stylegan2-ada-ffhq-1024.pkl", "https://nvlabs-fi-cdn.nvidia.com/", "--generator")
    assert os.listdir(tmp_path) == []


def test_no_mapper_says_how_to_get_one(tmp_path, run_cli):
    result = run_cli(infer_main, ["--generator", "tiny", "--clip", "tiny", "a"], tmp_path)
    assert_one_error_line(result, 1, "no trained mapper", "--mapper RUN", "t2f-train --generator tiny --clip tiny")


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "foreign", "mismatch"])
def test_bad_weights(tmp_path, tiny_generator, kind, run_cli):
    weights = tmp_path / "weights"
    weights.mkdir()
    if kind == "truncated":
        path = weights / "g.pkl"
        write_nvidia_pickle(tiny_generator, path)
        path.write_bytes(path.read_bytes()[:5000])
        fragment = "truncated or corrupt"
    elif kind == "corrupt":
        path = save_generator(tiny_generator, weights / "g")
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
        fragment = "truncated or corrupt"
    elif kind == "foreign":
        path = weights / "g.pkl"
        path.write_bytes(pickle.dumps({"G_ema": Evil()}, protocol=4))
        fragment = "refusing to load global"
    else:
        path = save_generator(tiny_generator, weights / "g")
        meta = json.loads((path / "config.json").read_text())
        meta["config"]["w_dim"] = 16
        (path / "config.json").write_text(json.dumps(meta))
        fragment = "do not match the config"
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(infer_main, ["--generator", str(path), "--clip", "tiny", "--mapper", "tiny", "a", "--save-ws", "ws.npy"], out)
    assert_one_error_line(result, 1, fragment)
    assert os.listdir(out) == []


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unwritable_output(tmp_path, run_cli):
    (tmp_path / "file.txt").write_text("a file, not a directory")
    result = run_cli(infer_main, [*TINY, "a", "--out", "file.txt/f.png"], tmp_path)
    assert_one_error_line(result, 2, "cannot write")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_output_is_a_directory(tmp_path, run_cli):
    (tmp_path / "faces.png").mkdir()
    result = run_cli(infer_main, [*TINY, "a"], tmp_path)
    assert_one_error_line(result, 2, "is a directory")


# ----------------------------------------------------------------------------
# t2f-convert.


def test_convert_nvidia_pickle(tmp_path, tiny_generator, run_cli):
    write_nvidia_pickle(tiny_generator, tmp_path / "net.pkl")
    result = run_cli(convert_main, ["net.pkl", "--out", "converted"], tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "converted")) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["source"] == "net.pkl"
    again = run_cli(convert_main, ["net.pkl", "--out", "converted"], tmp_path)
    assert_one_error_line(again, 2, "already exists")
    assert run_cli(convert_main, ["net.pkl", "--out", "converted", "--overwrite"], tmp_path).exit_code == 0
    # The converted directory drives t2f-infer.
    assert run_cli(infer_main, ["--generator", "converted", "--clip", "tiny", "--mapper", "tiny", "a", "--n", "1"], tmp_path).exit_code == 0


def test_convert_refuses_malicious_pickle(tmp_path, run_cli):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": Evil()}, protocol=4))
    result = run_cli(convert_main, ["evil.pkl", "--out", "converted"], tmp_path)
    assert_one_error_line(result, 1, "refusing to load global")
    assert sorted(os.listdir(tmp_path)) == ["evil.pkl"]


# ----------------------------------------------------------------------------
# The installed console scripts.


@pytest.mark.slow
def test_console_scripts(tmp_path):
    env = dict(os.environ, T2F_OFFLINE="1", HF_HUB_OFFLINE="1")
    bindir = os.path.dirname(sys.executable)
    infer = os.path.join(bindir, "t2f-infer") if os.path.exists(os.path.join(bindir, "t2f-infer")) else "t2f-infer"
    ok = subprocess.run([infer, *TINY, "a smiling woman", "--n", "2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "faces.png").exists()
    bad = subprocess.run([infer, *TINY, " "], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_convert_overwrite_refuses_a_foreign_directory(tmp_path, tiny_generator, run_cli):
    write_nvidia_pickle(tiny_generator, tmp_path / "net.pkl")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    result = run_cli(convert_main, ["net.pkl", "--out", "notes", "--overwrite"], tmp_path)
    assert_one_error_line(result, 2, "not a t2f generator directory")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_outputs_have_the_usual_permissions(tmp_path, run_cli):
    old = os.umask(0o022)
    try:
        assert run_cli(infer_main, [*TINY, "a", "--n", "1", "--save-ws", "ws.npy"], tmp_path).exit_code == 0
    finally:
        os.umask(old)
    for name in ("faces.png", "ws.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_no_output(tmp_path):
    import click

    from t2f.cli import write_files as _write_all

    (tmp_path / "blocker").write_text("a file where a directory should be")
    with pytest.raises(click.ClickException, match="cannot write"):
        _write_all({str(tmp_path / "a.png"): b"1", str(tmp_path / "blocker" / "b.png"): b"2"})
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


def test_invisible_prompt_and_ws_over_the_grid(tmp_path, run_cli):
    assert_one_error_line(run_cli(infer_main, [*TINY, "\u200b "], tmp_path), 2, "empty")
    assert_one_error_line(run_cli(infer_main, [*TINY, "a", "--save-ws", "faces.png"], tmp_path), 2, "--save-ws")
    assert os.listdir(tmp_path) == []
