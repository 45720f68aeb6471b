"""Hostile and careless input (issue 10): crafted files built here, each refused with one clear line.

Outputs: only new paths and regular files are replaced. Options: no NaN or infinity anywhere.
"""

import os
import stat

import PIL.Image
import pytest
from click.testing import CliRunner

from t2f.convert import main as convert_main
from t2f.engine.bench import main as bench_main
from t2f.engine.cli import main as infer_main
from t2f.export.cli import main as export_main
from t2f.trainer.cli import main as train_main

TINY = ["--generator", "tiny", "--clip", "tiny", "--mapper", "tiny"]


def invoke(main, args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def assert_one_error_line(result, code, *fragments):
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------
# 1. Outputs never replace special files or symlinks.


def _special(tmp_path, kind):
    path = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "real.png").write_bytes(b"keep me")
        path.symlink_to(tmp_path / "real.png")
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere.png")
    elif kind == "socket":
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    return path


def _unchanged(tmp_path, path, kind):
    mode = os.lstat(path).st_mode
    if kind == "fifo":
        return stat.S_ISFIFO(mode)
    if kind == "socket":
        return stat.S_ISSOCK(mode)
    return stat.S_ISLNK(mode) and (kind != "symlink" or (tmp_path / "real.png").read_bytes() == b"keep me")


KINDS = ["fifo", "symlink", "dangling symlink", "socket"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", ["--out", "--save-ws"])
def test_infer_refuses_to_replace_special_files(tmp_path, kind, option):
    target = _special(tmp_path, kind)
    name = "target.png" if option == "--out" else "target"
    if option == "--out":
        target = target.rename(tmp_path / name)
    args = [*TINY, "a face", option, name] + (["--out", "grid.png"] if option != "--out" else [])
    result = invoke(infer_main, args, tmp_path)
    assert_one_error_line(result, 2, option, "target")
    assert _unchanged(tmp_path, target, kind)
    assert not (tmp_path / "grid.png").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_infer_refuses_a_special_file_inside_save_images(tmp_path):
    (tmp_path / "each").mkdir()
    os.mkfifo(tmp_path / "each" / "p000_s000.png")
    result = invoke(infer_main, [*TINY, "a face", "--n", "2", "--save-images", "each"], tmp_path)
    assert_one_error_line(result, 1, "p000_s000.png", "FIFO")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "each" / "p000_s000.png").st_mode)
    assert sorted(os.listdir(tmp_path / "each")) == ["p000_s000.png"] and not (tmp_path / "faces.png").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/full"), reason="replacing /dev/full needs root to be possible at all")
def test_infer_does_not_replace_a_device_as_root(tmp_path):
    before = os.lstat("/dev/full")
    result = invoke(infer_main, [*TINY, "a face", "--save-ws", "/dev/full"], tmp_path)
    assert_one_error_line(result, 2, "character device")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode) and os.lstat("/dev/full").st_ino == before.st_ino


def test_a_symlinked_output_directory_is_written_into_but_never_replaced(tmp_path, tiny_generator):
    from t2f.weights import save_generator

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = invoke(infer_main, [*TINY, "a face", "--n", "1", "--save-images", "link"], tmp_path)
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / "real") == ["p000_s000.png"]
    # t2f-convert replaces its output directory as a whole: a symlink there is refused.
    save_generator(tiny_generator, tmp_path / "gen")
    (tmp_path / "gen-link").symlink_to(tmp_path / "gen")
    result = invoke(convert_main, ["gen", "--out", "gen-link", "--overwrite"], tmp_path)
    assert_one_error_line(result, 2, "symlink")
    assert os.path.islink(tmp_path / "gen-link")


def test_library_writers_refuse_special_files(tmp_path):
    from t2f.io import OutputPathError, atomic_path, write_json

    os.mkfifo(tmp_path / "options.json")
    with pytest.raises(OutputPathError, match="FIFO"):
        write_json(tmp_path / "options.json", {})
    # A regular file swapped for a FIFO while the data was being written is not replaced either.
    with pytest.raises(OutputPathError, match="FIFO"):
        with atomic_path(tmp_path / "late.json") as tmp:
            tmp.write_text("{}")
            os.mkfifo(tmp_path / "late.json")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "late.json").st_mode)
    assert sorted(os.listdir(tmp_path)) == ["late.json", "options.json"]


def test_train_refuses_a_fifo_for_its_options(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "options.json")
    result = invoke(train_main, ["synth", "--generator", "tiny", "--clip", "tiny", "--out", run, "--samples", 8,
                                 "--shard-size", 8, "--no-progress"], tmp_path)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert stat.S_ISFIFO(os.lstat(run / "options.json").st_mode)


# ----------------------------------------------------------------------------
# 5, 6. Every float option refuses NaN and infinity up front.


TRAIN = ["--generator", "tiny", "--clip", "tiny", "--no-progress"]
FLOAT_OPTIONS = [
    (infer_main, [*TINY, "a face"], "--truncation"),
    (infer_main, [*TINY, "a face", "--mode", "knn", "--bank", "b.safetensors"], "--knn-alpha"),
    *[(train_main, TRAIN, option) for option in ("--lr", "--kl", "--clip-weight", "--ema", "--val-fraction")],
    *[(train_main, ["fit"], option) for option in ("--lr", "--kl", "--clip-weight", "--ema", "--val-fraction")],
]


def _float_options(command):
    import click

    from t2f.cli_errors import FiniteFloatRange

    commands = [command] + list(getattr(command, "commands", {}).values())
    return [(c.name, p.opts[0], type(p.type)) for c in commands for p in c.params
            if isinstance(p.type, click.types.FloatParamType) or isinstance(p.type, FiniteFloatRange)]


@pytest.mark.parametrize("command", [infer_main, train_main, export_main, bench_main, convert_main], ids=lambda c: c.name)
def test_every_float_option_of_every_command_is_finite(command):
    from t2f.cli_errors import FiniteFloatRange

    found = _float_options(command)
    assert all(kind is FiniteFloatRange for _, _, kind in found), found


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("main,base,option", FLOAT_OPTIONS, ids=lambda v: v if isinstance(v, str) else None)
def test_nan_and_infinity_are_refused(tmp_path, main, base, option, value):
    args = [*base, option, value] if main is not train_main else [*base, "--out", tmp_path / "run", option, value]
    if main is train_main and base[0] == "fit":
        args = ["fit", "--out", tmp_path / "run", option, value]
    result = invoke(main, args, tmp_path)
    assert_one_error_line(result, 2, option, "finite")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# 14. Messages.


@pytest.mark.parametrize("main,args,option", [
    (infer_main, [*TINY, "a face", "--out", ""], "--out"),
    (infer_main, [*TINY, "a face", "--save-ws", ""], "--save-ws"),
    (infer_main, [*TINY, "a face", "--save-images", ""], "--save-images"),
    (convert_main, ["tiny", "--out", ""], "--out"),
    (export_main, [*TINY, "--out", "", "--onnx-only"], "--out"),
    (train_main, [*TRAIN, "--out", ""], "--out"),
    (bench_main, ["--json", ""], "--json"),
])
def test_an_empty_output_path_is_one_clear_line(tmp_path, main, args, option):
    result = invoke(main, args, tmp_path)
    assert_one_error_line(result, 2, option, "must not be empty")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name,image_format", [("faces.jpg", "JPEG"), ("faces.JPEG", "JPEG"), ("faces.png", "PNG")])
def test_out_extension_names_the_format_written(tmp_path, name, image_format):
    result = invoke(infer_main, [*TINY, "a face", "--n", "2", "--out", name], tmp_path)
    assert result.exit_code == 0, result.output
    with PIL.Image.open(tmp_path / name) as im:
        assert im.format == image_format and im.size == (128, 64)


@pytest.mark.parametrize("name", ["faces.gif", "faces", "faces.png.tmp"])
def test_out_with_an_unknown_extension_is_refused(tmp_path, name):
    result = invoke(infer_main, [*TINY, "a face", "--out", name], tmp_path)
    assert_one_error_line(result, 2, "--out", ".png, .jpg, .jpeg")
    assert os.listdir(tmp_path) == []
