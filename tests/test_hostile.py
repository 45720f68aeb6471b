"""Hostile and careless input: crafted files built here, each refused with one clear line.

Outputs: only new paths and regular files are replaced. Options: no NaN or infinity anywhere.
"""

import os
import stat

import PIL.Image
import pytest

from t2f.export.convert import main as convert_main
from t2f.engine.bench import main as bench_main
from t2f.engine.cli import main as infer_main
from t2f.engine.serve import main as serve_main
from t2f.export.cli import main as export_main
from t2f.trainer.cli import main as train_main

from helpers import TINY, FakeNvidia, Record, assert_one_error_line, child_holding, invoke, to_rosinality, write_nvidia_pickle


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
def test_infer_refuses_to_replace_special_files(tmp_path, kind, option, run_cli):
    target = _special(tmp_path, kind)
    name = "target.png" if option == "--out" else "target"
    if option == "--out":
        target = target.rename(tmp_path / name)
    args = [*TINY, "a face", option, name] + (["--out", "grid.png"] if option != "--out" else [])
    result = run_cli(infer_main, args, tmp_path)
    assert_one_error_line(result, 2, option, "target")
    assert _unchanged(tmp_path, target, kind)
    assert not (tmp_path / "grid.png").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.slow
def test_infer_refuses_a_special_file_inside_save_images(tmp_path, run_cli):
    (tmp_path / "each").mkdir()
    os.mkfifo(tmp_path / "each" / "p000_s000.png")
    result = run_cli(infer_main, [*TINY, "a face", "--n", "2", "--save-images", "each"], tmp_path)
    assert_one_error_line(result, 1, "p000_s000.png", "FIFO")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "each" / "p000_s000.png").st_mode)
    assert sorted(os.listdir(tmp_path / "each")) == ["p000_s000.png"] and not (tmp_path / "faces.png").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/full"), reason="replacing /dev/full needs root to be possible at all")
def test_infer_does_not_replace_a_device_as_root(tmp_path, run_cli):
    before = os.lstat("/dev/full")
    result = run_cli(infer_main, [*TINY, "a face", "--save-ws", "/dev/full"], tmp_path)
    assert_one_error_line(result, 2, "character device")
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode) and os.lstat("/dev/full").st_ino == before.st_ino


def test_a_symlinked_output_directory_is_written_into_but_never_replaced(tmp_path, tiny_generator, run_cli):
    from t2f.weights import save_generator

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = run_cli(infer_main, [*TINY, "a face", "--n", "1", "--save-images", "link"], tmp_path)
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / "real") == ["p000_s000.png"]
    # t2f-convert replaces its output directory as a whole: a symlink there is refused.
    save_generator(tiny_generator, tmp_path / "gen")
    (tmp_path / "gen-link").symlink_to(tmp_path / "gen")
    result = run_cli(convert_main, ["gen", "--out", "gen-link", "--overwrite"], tmp_path)
    assert_one_error_line(result, 2, "symlink")
    assert os.path.islink(tmp_path / "gen-link")


def test_library_writers_refuse_special_files(tmp_path):
    from t2f.files import OutputPathError, atomic_path, write_json

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


def test_train_refuses_a_fifo_for_its_options(tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "options.json")
    result = run_cli(train_main, ["synth", "--generator", "tiny", "--clip", "tiny", "--out", run, "--samples", 8,
                                  "--shard-size", 8, "--no-progress"], tmp_path)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert stat.S_ISFIFO(os.lstat(run / "options.json").st_mode)


# ----------------------------------------------------------------------------
# 5, 6. Every float option refuses NaN and infinity up front.


TRAIN = ["--generator", "tiny", "--clip", "tiny", "--no-progress"]
FLOAT_OPTIONS = [
    (infer_main, [*TINY, "a face"], "--truncation"),
    (infer_main, [*TINY, "a face", "--mode", "knn", "--bank", "b.safetensors"], "--knn-alpha"),
    *[(train_main, TRAIN, option) for option in ("--lr", "--kl", "--clip-weight", "--ema", "--val-fraction", "--prior-weight")],
    *[(train_main, ["fit"], option) for option in ("--lr", "--kl", "--clip-weight", "--ema", "--val-fraction", "--prior-weight")],
]


def _float_options(command):
    import click

    from t2f.cli import FiniteFloatRange

    commands = [command] + list(getattr(command, "commands", {}).values())
    return [(c.name, p.opts[0], type(p.type)) for c in commands for p in c.params
            if isinstance(p.type, click.types.FloatParamType) or isinstance(p.type, FiniteFloatRange)]


@pytest.mark.parametrize("command", [infer_main, train_main, export_main, bench_main, convert_main, serve_main],
                         ids=lambda c: c.name)
def test_every_float_option_of_every_command_is_finite(command):
    from t2f.cli import FiniteFloatRange

    found = _float_options(command)
    assert all(kind is FiniteFloatRange for _, _, kind in found), found


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("main,base,option", FLOAT_OPTIONS, ids=lambda v: v if isinstance(v, str) else None)
def test_nan_and_infinity_are_refused(tmp_path, main, base, option, value, run_cli):
    args = [*base, option, value] if main is not train_main else [*base, "--out", tmp_path / "run", option, value]
    if main is train_main and base[0] == "fit":
        args = ["fit", "--out", tmp_path / "run", option, value]
    result = run_cli(main, args, tmp_path)
    assert_one_error_line(result, 2, option, "finite")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Sizes and counts out of range: one line and exit 2 before anything is written, not an allocation failing inside a stage.

TOO_LARGE = [("--batch", 10**12), ("--samples", 10**12), ("--shard-size", 10**7), ("--synth-batch", 10**6), ("--steps", 10**12),
             ("--hidden", 16385), ("--z-dim", 8193), ("--layers", 65), ("--clip-batch", 10**6), ("--downsample", 8193),
             ("--warmup", 10**12), ("--eval-every", 10**12), ("--seed", 2**64), ("--bank-size", 10**12), ("--max-shards", 10**7),
             ("--stop-after", 10**12), ("--batch", 0)]


@pytest.mark.parametrize("option,value", TOO_LARGE, ids=[f"{o}={v}" for o, v in TOO_LARGE])
def test_out_of_range_training_sizes_are_one_line_before_anything_is_written(option, value, tmp_path, run_cli):
    result = run_cli(train_main, [*TRAIN, "--out", tmp_path / "run", option, value], tmp_path)
    assert_one_error_line(result, 2, option, f"{value} is not in the range")
    assert os.listdir(tmp_path) == []                                 # no run directory, no options.json, no lock


def test_a_refused_fit_leaves_the_run_as_it_was(tmp_path, run_cli):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "options.json").write_text(json.dumps({"kind": "t2f-train-run", "synth": {"identity": {"samples": 64}}}))
    (run / "stats.jsonl").write_text("")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = run_cli(train_main, ["fit", "--out", run, "--batch", 10**12], tmp_path)
    assert_one_error_line(result, 2, "--batch", "1000000000000 is not in the range 1<=x<=65536")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_the_training_api_refuses_out_of_range_sizes_when_the_config_is_made():
    import t2f.trainer as T

    with pytest.raises(ValueError, match=r"^FitOptions.batch must be an integer from 1 to 65536, got 1000000000000$"):
        T.FitOptions(batch=10**12)
    with pytest.raises(ValueError, match=r"^SynthOptions.samples must be an integer from 1 to 1000000000, got 0$"):
        T.SynthOptions(samples=0)
    with pytest.raises(ValueError, match=r"^FitOptions.hidden must be an integer from 1 to 16384, got 16384.0$"):
        T.FitOptions(hidden=16384.0)
    with pytest.raises(ValueError, match=r"^TrainConfig.stop_after must be an integer from 1 to 1000000000, got 0$"):
        T.TrainConfig(stop_after=0)
    assert T.TrainConfig(stop_after=None).stop_after is None and T.SynthOptions(max_shards=None).max_shards is None


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
def test_an_empty_output_path_is_one_clear_line(tmp_path, main, args, option, run_cli):
    result = run_cli(main, args, tmp_path)
    assert_one_error_line(result, 2, option, "must not be empty")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("name,image_format", [("faces.jpg", "JPEG"), ("faces.JPEG", "JPEG"), ("faces.png", "PNG")])
def test_out_extension_names_the_format_written(tmp_path, name, image_format, run_cli):
    result = run_cli(infer_main, [*TINY, "a face", "--n", "2", "--out", name], tmp_path)
    assert result.exit_code == 0, result.output
    with PIL.Image.open(tmp_path / name) as im:
        assert im.format == image_format and im.size == (128, 64)


@pytest.mark.parametrize("name", ["faces.gif", "faces", "faces.png.tmp"])
def test_out_with_an_unknown_extension_is_refused(tmp_path, name, run_cli):
    result = run_cli(infer_main, [*TINY, "a face", "--out", name], tmp_path)
    assert_one_error_line(result, 2, "--out", ".png, .jpg, .jpeg")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# 2, 3, 4. The importer: work and memory bounded by the file's size, one clear error for any bytes.


@pytest.fixture
def hang_guard():
    """Turn a hang into a failure (the importer once took forever on a 3 KB file); not a timing assertion."""
    import signal

    def expired(*_):
        raise AssertionError("the importer did not finish within 120 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _pickle_with_g_ema(path, g_ema_state, protocol=4):
    """A network pickle whose G_ema is a persistent record with this state (NVIDIA's layout)."""
    import pickle

    with FakeNvidia() as fake:
        record = Record(fake, "Generator", g_ema_state(fake))
        with open(path, "wb") as f:
            pickle.dump(dict(G_ema=record), f, protocol=protocol)
    return path


def _import_error(path) -> str:
    from t2f.io import WeightsError
    from t2f.weights import import_generator

    with pytest.raises(WeightsError) as e:
        import_generator(path)
    message = str(e.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def test_modules_shared_down_a_deep_tree_are_walked_once(tmp_path, hang_guard):
    import collections

    def state(fake):
        module = Record(fake, "Leaf", {"_parameters": {}, "_buffers": {}, "_modules": {}})
        for depth in range(15):        # 6^15 paths, 16 modules
            module = Record(fake, f"Level{depth}", {"_parameters": {}, "_buffers": {},
                                                     "_modules": collections.OrderedDict((k, module) for k in "abcdef")})
        return {"_init_kwargs": {"z_dim": 8}, "_modules": {"mapping": module}}

    path = _pickle_with_g_ema(tmp_path / "dag.pkl", state)
    assert path.stat().st_size < 8192
    assert "refusing an object graph that unfolds" in _import_error(path)


def _shared_tuple_key_pickle(levels: int = 64) -> bytes:
    """Raw protocol-2 opcodes for {"G_ema": {key: 1}}, key = (t, t) with t = (u, u) ... `levels` deep: 2^levels to hash.

    Written by hand: building that dict in Python would itself hash the key.
    """
    ops = bytearray(b"\x80\x02}X\x05\x00\x00\x00G_ema}")          # PROTO 2, EMPTY_DICT, "G_ema", EMPTY_DICT
    ops += b"K\x01q\x00"                                               # 1, memo[0]
    for i in range(1, levels + 1):
        ops += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])   # memo[i] = (memo[i-1], memo[i-1])
    ops += b"K\x01ss."                                                  # {key: 1}, then {"G_ema": ...}
    return bytes(ops)


def test_a_shared_tuple_tree_as_a_dict_key_is_refused(tmp_path, hang_guard):
    import zipfile

    path = tmp_path / "hash.pkl"
    path.write_bytes(_shared_tuple_key_pickle())
    assert path.stat().st_size < 1024
    assert "refusing a tuple as a dict key" in _import_error(path)
    # The same inside a torch zip checkpoint (torch.load would hang on it: t2f never calls torch.load on a weights file).
    with zipfile.ZipFile(tmp_path / "hash.pt", "w") as archive:
        archive.writestr("archive/data.pkl", _shared_tuple_key_pickle())
        archive.writestr("archive/byteorder", "little")
    assert "refusing a tuple as a dict key" in _import_error(tmp_path / "hash.pt")


def test_a_deeply_nested_pickle_is_refused(tmp_path, hang_guard):
    nested = b"".join([b"\x80\x04", b"]" * 200_000, b"a" * 199_999, b"."])   # a list in a list ... 200000 deep
    path = tmp_path / "deep.pkl"
    path.write_bytes(nested)
    assert "nested deeper than" in _import_error(path)


class _View:
    """Pickles as torch._utils._rebuild_tensor_v2 over `storage` with any size and stride."""

    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        import collections

        import torch

        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False, collections.OrderedDict())


def test_a_stride_zero_view_is_not_materialized(tmp_path, hang_guard):
    import resource

    import torch

    storage = torch.zeros(4).storage()
    path = _pickle_with_g_ema(tmp_path / "expand.pkl", lambda fake: {
        "_init_kwargs": {}, "_parameters": {}, "_modules": {},
        "_buffers": {"big": _View(storage, (100_000, 100_000), (0, 0))}})     # 4e10 bytes from a 16-byte storage
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert "refusing a tensor view of 10000000000 elements over a storage of 4" in _import_error(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20     # KiB: under 1 GiB more


def test_many_views_of_one_storage_are_capped_by_the_file_size(tmp_path, hang_guard):
    import torch

    storage = torch.zeros(1 << 18).storage()        # 1 MiB, stored once, viewed 300 times
    path = _pickle_with_g_ema(tmp_path / "views.pkl", lambda fake: {
        "_init_kwargs": {}, "_parameters": {}, "_modules": {},
        "_buffers": {f"b{i}": _View(storage, (1 << 18,), (1,)) for i in range(300)}})
    assert path.stat().st_size < 2 << 20
    assert "larger in all than the file" in _import_error(path)


def test_a_pickle_cut_inside_a_length_field_is_one_error(tmp_path, tiny_generator):
    import pickletools

    write_nvidia_pickle(tiny_generator, tmp_path / "net.pkl", protocol=4)
    data = (tmp_path / "net.pkl").read_bytes()
    # Cut one byte into the 8-byte length of the first FRAME / BINBYTES8 / BINUNICODE8 opcode.
    cut = next(pos for op, _, pos in pickletools.genops(data) if op.name in ("FRAME", "BINUNICODE", "BINBYTES")) + 2
    (tmp_path / "cut.pkl").write_bytes(data[:cut])
    assert "truncated or corrupt pickle" in _import_error(tmp_path / "cut.pkl")


def test_fuzzed_pickles_and_checkpoints_give_one_error_line(tmp_path, tiny_generator, hang_guard):
    """Random truncations and byte flips of a valid pickle and checkpoint (40 + 12 files, seeded): each one either
    imports as a generator or raises one WeightsError line; nothing else escapes, nothing hangs."""
    import numpy as np
    import torch

    from t2f.io import WeightsError
    from t2f.stylegan2 import Generator
    from t2f.weights import import_generator

    write_nvidia_pickle(tiny_generator, tmp_path / "net.pkl", protocol=2)
    state = to_rosinality(tiny_generator)
    torch.save({"g_ema": state, "latent_avg": state.pop("latent_avg")}, tmp_path / "net.pt")
    rng = np.random.default_rng(10)
    outcomes = {"imported": 0, "refused": 0}
    for source, count in (("net.pkl", 40), ("net.pt", 12)):
        data = bytearray((tmp_path / source).read_bytes())
        for i in range(count):
            damaged = bytearray(data)
            if i % 2:
                damaged = damaged[: int(rng.integers(1, len(data)))]
            else:
                # Flips mostly in the first 4 KiB, where the opcodes and lengths are (the rest is tensor data).
                for pos in rng.integers(0, min(len(data), 4096), size=int(rng.integers(1, 8))):
                    damaged[pos] ^= int(rng.integers(1, 256))
            path = tmp_path / f"fuzz-{i}{os.path.splitext(source)[1]}"
            path.write_bytes(bytes(damaged))
            try:
                assert isinstance(import_generator(path), Generator)
                outcomes["imported"] += 1
            except WeightsError as e:
                assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
                outcomes["refused"] += 1
    assert outcomes["refused"] >= 30, outcomes      # every truncation is refused; most flips are


# ----------------------------------------------------------------------------
# Training: 5 (a non-finite loss), 8 (one rule for changed fit options), 10 (disk full), 13 (one process per run).

SMALL_FIT = ["--steps", 6, "--batch", 16, "--hidden", 16, "--z-dim", 4, "--clip-every", 0, "--warmup", 0,
             "--checkpoint-every", 2, "--eval-every", 100, "--log-every", 1, "--val-fraction", 0.1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A tiny synth stage to copy for fit experiments."""
    run = tmp_path_factory.mktemp("hostile") / "pairs"
    invoke(train_main, ["synth", *TRAIN, "--out", run, "--samples", 64, "--shard-size", 32, "--synth-batch", 32], expect=0)
    return run


def _copy(pairs, tmp_path):
    import shutil

    return shutil.copytree(pairs, tmp_path / "run")


def test_a_non_finite_loss_stops_fit_before_anything_from_that_step(pairs, tmp_path, monkeypatch, run_cli):
    import json

    import torch

    from t2f.trainer import fit as fit_module

    run = _copy(pairs, tmp_path)
    real = fit_module.kl_divergence
    calls = []

    def kl_going_bad(mu, logvar):             # the KL blows up on the 3rd step
        calls.append(1)
        return real(mu, logvar) * (float("nan") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(fit_module, "kl_divergence", kl_going_bad)
    result = run_cli(train_main, ["fit", "--out", run, "--no-progress", *SMALL_FIT], tmp_path)
    assert_one_error_line(result, 1, "fit step 3", "not finite")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2       # from step 2, none from step 3
    assert [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / "model.safetensors").exists()
    monkeypatch.setattr(fit_module, "kl_divergence", real)
    # The run is not locked by the failure: the same command resumes from step 2 and finishes.
    result = run_cli(train_main, ["fit", "--out", run, "--no-progress", *SMALL_FIT], tmp_path)
    assert result.exit_code == 0, result.output
    assert (run / "model.safetensors").exists()


@pytest.mark.parametrize("command", [["fit"], []], ids=["fit", "whole-pipeline"])
def test_fit_options_may_change_until_fit_has_written_a_checkpoint(pairs, tmp_path, command, run_cli):
    import json

    from t2f.trainer.cli import _fit_identity, _fit_options
    from t2f.trainer.run import Run

    run = _copy(pairs, tmp_path)
    # What a fit killed before its first checkpoint leaves: its options recorded, nothing else.
    options = dict(embed_noise="0.75:1.0", lr=0.0002, steps=6, batch=16, hidden=16, z_dim=4, clip_every=0, warmup=0)
    Run(run).claim("fit", _fit_identity(_fit_options(options))[0])

    def args(lr):
        stages = [] if command else [*TRAIN[:4], "--samples", 64, "--shard-size", 32, "--synth-batch", 32]
        return [*command, "--out", run, "--no-progress", *SMALL_FIT, "--lr", lr, *stages]

    result = run_cli(train_main, args(0.001), tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "options.json").read_text())["fit"]["identity"]["lr"] == 0.001
    # Once a checkpoint exists the options are the run's: both forms refuse a change alike.
    result = run_cli(train_main, args(0.002), tmp_path)
    assert_one_error_line(result, 1, "fit lr was 0.001, now 0.002")


def test_disk_full_while_training_is_one_line_and_leaves_nothing_partial(pairs, tmp_path, monkeypatch, run_cli):
    import errno
    import pathlib

    run = _copy(pairs, tmp_path)
    real_write = pathlib.Path.write_bytes

    def full(self, data):
        if self.name.startswith(".checkpoint.pt.") or self.name.startswith(".shard-"):
            real_write(self, bytes(data)[: len(data) // 2])           # half of it lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    result = run_cli(train_main, ["fit", "--out", run, "--no-progress", *SMALL_FIT], tmp_path)
    assert_one_error_line(result, 1, "cannot write", "checkpoint.pt", "No space left on device")
    assert not (run / "checkpoint.pt").exists() and not [p for p in os.listdir(run) if p.endswith(".tmp")]
    # A synth shard.
    result = run_cli(train_main, ["synth", *TRAIN, "--out", tmp_path / "new", "--samples", 8, "--shard-size", 8], tmp_path)
    assert_one_error_line(result, 1, "cannot write", "shard-00000.safetensors", "No space left on device")
    assert not [p for p in os.listdir(tmp_path / "new" / "pairs") if p != "manifest.json"]


@pytest.mark.slow
def test_disk_full_for_real_with_a_file_size_limit(pairs, tmp_path):
    """The same through the kernel: a child process whose files may not grow past 4 KiB (RLIMIT_FSIZE)."""
    import resource
    import signal
    import subprocess
    import sys

    run = _copy(pairs, tmp_path)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    args = [sys.executable, "-m", "t2f.trainer.cli", "fit", "--out", str(run), "--no-progress", *map(str, SMALL_FIT)]
    result = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("Error")] == \
        [f"Error: cannot write {run / 'checkpoint.pt'}: File too large"]
    assert not (run / "checkpoint.pt").exists() and not [p for p in os.listdir(run) if p.endswith(".tmp")]


def _lock_held_by_another_process(directory):
    """A child process holding `directory`'s lock until the block ends."""
    import sys

    code = (f"import sys\nfrom t2f.private import directory_lock\nwith directory_lock({str(directory)!r}, 'test'):\n"
            "    print('held', flush=True)\n    sys.stdin.read()")
    return child_holding([sys.executable, "-c", code])


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_says_who_holds_it(pairs, tmp_path, run_cli):
    run = _copy(pairs, tmp_path)
    with _lock_held_by_another_process(run) as holder:
        stats_before = (run / "stats.jsonl").exists()
        result = run_cli(train_main, ["fit", "--out", run, "--no-progress", *SMALL_FIT], tmp_path)
        assert_one_error_line(result, 1, f"is in use by another t2f-train: pid {holder.pid} on ")
        assert (run / "stats.jsonl").exists() == stats_before and not (run / "checkpoint.pt").exists()
    # Released when the holder exits: the run goes on.
    assert run_cli(train_main, ["fit", "--out", run, "--no-progress", *SMALL_FIT], tmp_path).exit_code == 0


# ----------------------------------------------------------------------------
# Export: 9 (a directory of other files), 12 (temporaries of a killed export), 14 (no manifest).


def test_export_refuses_a_directory_that_is_not_an_export(tmp_path, run_cli):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text('{"my": "shipping list"}')
    result = run_cli(export_main, [*TINY, "--out", out, "--onnx-only"], tmp_path)
    assert_one_error_line(result, 2, "not a t2f-export output", "manifest.json")
    assert (out / "manifest.json").read_text() == '{"my": "shipping list"}' and os.listdir(out) == ["manifest.json"]
    (out / "manifest.json").unlink()
    (out / "notes.txt").write_text("keep")
    result = run_cli(export_main, [*TINY, "--out", out, "--onnx-only"], tmp_path)
    assert_one_error_line(result, 2, "not a t2f-export output", "notes.txt")
    assert os.listdir(out) == ["notes.txt"]


@pytest.mark.slow
def test_export_removes_the_temporaries_of_a_killed_export_and_holds_a_lock(tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    import json

    out = tmp_path / "export"
    (out / ".parity-k1ll3d").mkdir(parents=True)
    (out / ".parity-k1ll3d" / "text_encoder.onnx").write_bytes(b"half")
    (out / ".synthesis.onnx.abc123.tmp").write_bytes(b"half")
    (out / "synthesis.onnx").write_bytes(b"half of a graph, no manifest yet")
    with _lock_held_by_another_process(out) as holder:
        result = run_cli(export_main, [*TINY, "--out", out, "--onnx-only"], tmp_path)
        assert_one_error_line(result, 1, f"in use by another t2f-export: pid {holder.pid}")
        assert (out / ".synthesis.onnx.abc123.tmp").exists()          # a running export's files are left alone
    result = run_cli(export_main, [*TINY, "--out", out, "--onnx-only"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "removed 2 temporary file(s)" in result.output
    assert sorted(p for p in os.listdir(out) if p.startswith(".") and p != ".t2f.lock") == []
    assert "synthesis.onnx" in json.loads((out / "manifest.json").read_text())["onnx"]


def test_artifacts_without_a_manifest_say_so(tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "text_encoder.onnx").write_bytes(b"x")
    result = run_cli(infer_main, [*TINY, "a face", "--backend", "onnxruntime", "--artifacts", "artifacts"], tmp_path)
    assert_one_error_line(result, 1, "has no manifest.json", "not a t2f-export output")


# ----------------------------------------------------------------------------
# 6, 7. Non-finite results are refused, not saved as flat images; dtypes are checked against the config.


def _relabel_first_f32_as_i32(path):
    """Rewrite a safetensors header so its first float32 tensor claims to be int32 (same size, same bytes)."""
    import json

    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + n:]))
    return name


def test_a_float_tensor_relabelled_as_int32_is_refused(tmp_path, tiny_generator, run_cli):
    from t2f.weights import save_generator

    save_generator(tiny_generator, tmp_path / "gen")
    name = _relabel_first_f32_as_i32(tmp_path / "gen" / "model.safetensors")
    result = run_cli(infer_main, ["--generator", "gen", "--clip", "tiny", "--mapper", "tiny", "a face"], tmp_path)
    assert_one_error_line(result, 1, "wrong dtype", f"{name} torch.int32 != torch.float32")
    assert not (tmp_path / "faces.png").exists()


def test_non_finite_ws_are_refused_before_anything_is_written(tmp_path):
    import torch

    from t2f.engine import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", backend="torch", precision="fp32", progress=False)
    with torch.no_grad():
        for p in pipe.backend.mapper.parameters():       # the mapper graph the backend runs, gone NaN
            p.fill_(float("nan"))
    for mode in ("text", "image"):
        images = torch.zeros([1, 3, 64, 64]) if mode == "image" else None
        with pytest.raises(ValueError, match="non-finite ws"):
            pipe(["a face"], n=2, mode=mode, images=images, noise_mode="const" if mode == "text" else "random")


def test_knn_alpha_must_be_finite_in_the_library_too():
    from t2f.engine import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", backend="torch", precision="fp32", progress=False)
    for alpha in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="Dirichlet concentration must be a finite number > 0"):
            pipe(["a face"], n=2, mode="knn", knn=dict(alpha=alpha))


# ----------------------------------------------------------------------------
# 11. A huge conditioning image is refused from its header, in one line.


def _png_header_only(path, width, height):
    """A PNG that declares width x height (8-bit RGB) and holds no pixels: enough for the size check, 57 bytes."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_a_huge_conditioning_image_is_refused_in_one_line(tmp_path, run_cli):
    import warnings

    _png_header_only(tmp_path / "huge.png", 13000, 13000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # Pillow's DecompressionBombWarning must not escape
        result = run_cli(infer_main, [*TINY, "--mode", "image", "--image", "huge.png"], tmp_path)
    line = assert_one_error_line(result, 2, "--image", "13000x13000 (169 Mpixels)", "at most 40 Mpixels")
    assert "DecompressionBomb" not in result.output and "DecompressionBomb" not in line
    assert not (tmp_path / "faces.png").exists()


def test_convert_never_opens_a_fifo_for_the_config_of_the_directory_it_would_replace(tmp_path, hang_guard, run_cli):
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "config.json")
    result = run_cli(convert_main, ["tiny", "--out", "out", "--overwrite"], tmp_path)
    assert_one_error_line(result, 2, "refusing to replace", "not a t2f generator directory")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out" / "config.json").st_mode)


def test_export_never_opens_a_fifo_for_a_manifest(tmp_path, hang_guard, run_cli):
    out = tmp_path / "export"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    result = run_cli(export_main, [*TINY, "--out", out, "--onnx-only"], tmp_path)
    assert_one_error_line(result, 2, "not a t2f-export output", "manifest.json")
    assert stat.S_ISFIFO(os.lstat(out / "manifest.json").st_mode)
