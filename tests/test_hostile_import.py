"""Hostile weights and configuration files: crafted here, each refused with one clear line,
in work and memory proportional to its size.

The bounds are checked on work counted or in a child process under resource limits, never by timing
a call: a regression (math on a huge integer, reading overlapping zip entries) would run the child out
of CPU seconds or memory, which fails the test whatever the machine's load.
"""

import io
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
import zlib

import pytest
import torch
from click.testing import CliRunner

from helpers import TINY, write_nvidia_pickle
from t2f.io import WeightsError


def one_line(error) -> str:
    message = str(error)
    assert "\n" not in message and len(message) < 600 and "Traceback" not in message, message
    return message


def import_error(path) -> str:
    from t2f.weights import import_generator

    with pytest.raises(WeightsError) as e:
        import_generator(path)
    return one_line(e.value)


def in_a_child(code: str, cpu_seconds: int = 60) -> tuple[str, int]:
    """Run `code` in a fresh interpreter allowed `cpu_seconds` of CPU: (its last stdout line, its peak RSS growth in MiB
    after torch and t2f are imported). Over the limit the kernel stops it with SIGXCPU and the test fails."""
    script = textwrap.dedent("""\
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu} + 5))
        import torch, t2f.weights, t2f.io
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        def result():
        {code}
        print(result())
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
        """).format(cpu=cpu_seconds, code=textwrap.indent(textwrap.dedent(code), "    "))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the child ended with {done.returncode} (-24 or -9: out of CPU time): {done.stderr[-2000:]}"
    message, growth = done.stdout.strip().splitlines()[-2:]
    return message, int(growth)


IMPORT_MESSAGE = """\
try:
    t2f.weights.import_generator({path!r})
except t2f.io.WeightsError as e:
    return str(e)
return "imported"
"""


# ----------------------------------------------------------------------------
# 12. A tensor whose sizes and strides are one huge LONG4 integer, referenced 32 times.


def _storage_fragment() -> bytes:
    """The opcodes of a pickled 4-byte storage (torch.storage._load_from_bytes), without PROTO and STOP."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = pickle.dumps(torch.zeros(1, dtype=torch.uint8).storage(), protocol=2)
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return data[2:-1]


def huge_long4_pickle(path, size: int) -> None:
    """_rebuild_tensor_v2(storage, 0, (N,) * 16, (N,) * 16, False, {}) with N a LONG4 integer of `size` bytes, stored once."""
    memo = struct.pack("<I", 100_000)                               # far from the storage fragment's memo indices
    big = b"\x8b" + struct.pack("<i", size) + b"\x01" * size        # LONG4: a positive integer of 8 * size bits
    ops = bytearray(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(")   # PROTO 2, GLOBAL, MARK (the arguments)
    ops += _storage_fragment() + b"K\x00"                          # the storage, offset 0
    ops += b"(" + big + b"r" + memo + (b"j" + memo) * 15 + b"t"     # size: MARK, N, PUT, 15 x GET, TUPLE
    ops += b"(" + (b"j" + memo) * 16 + b"t"                         # stride: the same N 16 times
    ops += b"\x89}tR."                                              # False, {}, TUPLE, REDUCE, STOP
    path.write_bytes(bytes(ops))


def test_a_huge_long4_size_is_refused_before_any_arithmetic(tmp_path):
    path = tmp_path / "long4.pkl"
    huge_long4_pickle(path, 1 << 20)                                 # 1 MB: never finished in 900 s before the fix
    assert 1 << 20 < path.stat().st_size < (1 << 20) + 4096
    message, growth = in_a_child(IMPORT_MESSAGE.format(path=str(path)), cpu_seconds=60)
    assert message.startswith(str(path)) and "tensor size, stride or offset that is not an integer from 0 to 2**63" in message
    assert growth < 64, f"{growth} MiB"


def test_a_small_object_referenced_many_times_pays_each_time(tmp_path):
    """A 64 KiB string fed to _codecs.encode 2000 times (about 8 KB of opcodes) would copy 128 MiB; it is refused
    once the copies exceed what the file holds, before the memory is spent."""
    text = "x" * (1 << 16)
    ops = bytearray(b"\x80\x02c_codecs\nencode\nr" + struct.pack("<I", 1) + b"X" + struct.pack("<I", len(text)) + text.encode()
                    + b"r" + struct.pack("<I", 2) + b"(")
    ops += (b"j" + struct.pack("<I", 1) + b"j" + struct.pack("<I", 2) + b"X\x06\x00\x00\x00latin1\x86R") * 2000
    ops += b"l."                                                    # LIST of all of them, STOP
    path = tmp_path / "copies.pkl"
    path.write_bytes(bytes(ops))
    assert path.stat().st_size < 128 << 10
    assert "copies more bytes than the file holds" in import_error(path)


def test_a_long_flat_tuple_key_pays_for_each_hash(tmp_path):
    """One 40000-element tuple used as a dict key 4000 times: 1.6e8 element hashes for 40 KB of opcodes, refused as
    the work budget runs out."""
    memo = struct.pack("<I", 1)
    ops = bytearray(b"\x80\x02(" + b"K\x01" * 40_000 + b"tr" + memo + b"(")
    ops += (b"}j" + memo + b"K\x01s") * 4000                        # {key: 1}, 4000 times
    ops += b"l."
    path = tmp_path / "keys.pkl"
    path.write_bytes(bytes(ops))
    assert "costs more than" in import_error(path)


def test_a_shared_state_applied_many_times_pays_each_time(tmp_path):
    """One 20000-entry state dict set on 4000 Namespace stand-ins by BUILD: 8e7 updates for 200 KB, refused as the
    work budget runs out."""
    cls, state = struct.pack("<I", 1), struct.pack("<I", 2)
    ops = bytearray(b"\x80\x02cargparse\nNamespace\nr" + cls + b"}(")
    for i in range(20_000):
        key = f"k{i}".encode()
        ops += b"X" + struct.pack("<I", len(key)) + key + b"K\x01"
    ops += b"ur" + state + b"("
    ops += (b"j" + cls + b")\x81j" + state + b"b") * 4000            # cls.__new__(cls), then BUILD with the shared state
    ops += b"l."
    path = tmp_path / "build.pkl"
    path.write_bytes(bytes(ops))
    assert path.stat().st_size < 300 << 10
    assert "costs more than" in import_error(path)


# ----------------------------------------------------------------------------
# 13. A checkpoint whose stored zip entries overlap: each one is nearly the whole file.


def overlapping_checkpoint(path, entries: int = 500, kernel: int = 1 << 20) -> None:
    """A torch zip checkpoint whose data.pkl lists `entries` uint8 storages; entry i's bytes run from its local header
    to the end of a shared `kernel` of zeros, so each is about `kernel` long (David Fifield's overlapping zip)."""

    class Key:
        def __init__(self, key, size):
            self.key, self.size = key, size

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.ByteStorage, obj.key, "cpu", obj.size) if isinstance(obj, Key) else None

    names = [f"archive/data/{i}" for i in range(entries)]

    def local_header(name: str) -> bytes:        # CRC and sizes are read from the central directory only
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name.encode()

    headers = [local_header(n) for n in names]
    sizes = [sum(map(len, headers[i + 1:])) + kernel for i in range(entries)]
    buffer = bytearray()
    central = []

    def add(name: str, header: bytes, data_size: int, crc: int) -> None:
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, data_size, data_size,
                                   len(name), 0, 0, 0, 0, 0, len(buffer)) + name.encode())
        buffer.extend(header)

    data_pkl = io.BytesIO()
    Pickler(data_pkl, protocol=2).dump({"g_ema": [Key(str(i), sizes[i]) for i in range(entries)]})
    pkl = data_pkl.getvalue()
    add("archive/data.pkl", local_header("archive/data.pkl"), len(pkl), zlib.crc32(pkl))
    buffer.extend(pkl)
    zeros = bytes(kernel)
    for i, (name, header) in enumerate(zip(names, headers)):
        add(name, header, sizes[i], zlib.crc32(zeros, zlib.crc32(b"".join(headers[i + 1:]))))
    buffer.extend(zeros)
    directory = b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), len(directory), len(buffer), 0)
    path.write_bytes(bytes(buffer) + directory + end)


def test_overlapping_zip_entries_are_refused_before_they_are_read(tmp_path):
    path = tmp_path / "overlap.pt"
    overlapping_checkpoint(path)
    size = path.stat().st_size
    assert size < (1 << 20) + (128 << 10)
    with zipfile.ZipFile(path) as archive:                 # a well-formed archive, as far as this Python's zipfile can tell
        assert sum(info.file_size for info in archive.infolist()) > 400 * size
        assert archive.read("archive/data/499") == bytes(1 << 20)
    message, growth = in_a_child(IMPORT_MESSAGE.format(path=str(path)), cpu_seconds=60)
    assert "refusing archive entries that hold more bytes in all than the file" in message, message
    assert growth < 64, f"{growth} MiB for a {size >> 10} KiB file"      # reading them all took 1 GB before the fix


# ----------------------------------------------------------------------------
# 14. Sizes in config files: bounded, and the model built on the meta device must match the weights file.


@pytest.fixture
def mapper_dir(tmp_path, tiny_generator):
    from t2f.mapper import save_mapper
    from t2f.presets import random_mapper

    return save_mapper(random_mapper(tiny_generator, 128), tmp_path / "mapper")


def _set_config(directory, **changes):
    meta = json.loads((directory / "config.json").read_text())
    meta["config"].update(changes)
    (directory / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("changes,fragment", [
    (dict(layers=1_000_000), "layers must be an integer from 2 to 64, got 1000000"),
    (dict(hidden=2**62), "hidden must be an integer from 1 to 16384, got 4611686018427387904"),
    (dict(hidden=2**200), "hidden must be an integer from 1 to 16384, got an integer of 201 bits"),
    (dict(embed_dim=True), "embed_dim must be an integer from 1 to 8192, got True"),
    (dict(w_plus="yes"), "w_plus must be true or false"),
    (dict(z_dim=1.5), "z_dim must be an integer"),
])
def test_mapper_config_sizes_are_bounded(mapper_dir, changes, fragment):
    from t2f.mapper import load_mapper_dir

    _set_config(mapper_dir, **changes)
    with pytest.raises(WeightsError) as e:
        load_mapper_dir(mapper_dir)
    assert fragment in one_line(e.value)


def test_a_300_byte_mapper_config_asking_for_a_million_layers_is_one_line(mapper_dir, tmp_path):
    from t2f.engine.cli import main as infer_main

    _set_config(mapper_dir, layers=1_000_000)
    assert (mapper_dir / "config.json").stat().st_size < 600
    result = CliRunner().invoke(infer_main, ["--generator", "tiny", "--clip", "tiny", "--mapper", str(mapper_dir), "a face",
                                             "--out", str(tmp_path / "faces.png")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "layers must be an integer from 2 to 64" in errors[0], result.output


def test_a_config_within_its_bounds_still_has_to_match_the_weights_file(mapper_dir):
    """The bound on a config is what its weights can hold: a larger model than the file is refused by name, and
    built only on the meta device (no memory) before that."""
    from t2f.mapper import load_mapper_dir

    _set_config(mapper_dir, layers=64, hidden=16384)
    with pytest.raises(WeightsError) as e:
        load_mapper_dir(mapper_dir)
    assert "weights do not match the config" in one_line(e.value)


@pytest.mark.parametrize("changes,fragment", [
    (dict(resolution=2**80), "resolution must be a power of two from 4 to 8192, got an integer of 81 bits"),
    (dict(num_fp16_res=10**30), "num_fp16_res must be an integer from 0 to 64"),
    (dict(mapping_layers=10**6), "mapping_layers must be an integer from 1 to 64"),
    (dict(conv_clamp="inf"), "conv_clamp must be a positive number or null, got 'inf'"),
])
def test_generator_config_sizes_are_bounded(tmp_path, tiny_generator, changes, fragment):
    from t2f.weights import save_generator

    directory = save_generator(tiny_generator, tmp_path / "gen")
    _set_config(directory, **changes)
    assert fragment in import_error(directory)


# ----------------------------------------------------------------------------
# 15. Messages: img_resolution=inf, deeply nested JSON, a CLIP checkpoint with a pickled class.


@pytest.mark.parametrize("value,fragment", [
    (float("inf"), "img_resolution must be an integer, got inf"),
    (float("nan"), "img_resolution must be an integer, got nan"),
    (1024.5, "img_resolution must be an integer, got 1024.5"),
    (2**5000, "got an integer of 5001 bits"),
])
def test_an_nvidia_pickle_with_a_non_integer_resolution_is_one_line(tmp_path, tiny_generator, value, fragment):
    write_nvidia_pickle(tiny_generator, tmp_path / "net.pkl", init_overrides=dict(img_resolution=value))
    assert fragment in import_error(tmp_path / "net.pkl")


def test_an_nvidia_pickle_with_an_overflowing_lr_multiplier_is_one_line(tmp_path, tiny_generator):
    kwargs = dict(z_dim=32, w_dim=32, c_dim=0, img_resolution=64, img_channels=3,
                  mapping_kwargs=dict(num_layers=2, lr_multiplier=10**400),
                  synthesis_kwargs=dict(channel_base=1024, channel_max=32, num_fp16_res=2, conv_clamp=256))
    write_nvidia_pickle(tiny_generator, tmp_path / "net.pkl", init_kwargs=kwargs)
    assert "lr_multiplier must be a finite number" in import_error(tmp_path / "net.pkl")


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_in_a_model_config_is_one_line(mapper_dir):
    from t2f.mapper import load_mapper_dir

    (mapper_dir / "config.json").write_text('{"kind": "t2f-mapper", "config": ' + DEEP + "}")
    with pytest.raises(WeightsError) as e:
        load_mapper_dir(mapper_dir)
    assert "nested deeper than 32 levels" in one_line(e.value)


@pytest.mark.parametrize("name", ["options.json", "pairs/manifest.json"])
def test_deeply_nested_json_in_a_run_is_one_line(tmp_path, name):
    from t2f.trainer.run import Run, RunError
    from t2f.trainer.synth import load_pairs

    run = Run(tmp_path / "run")
    (run.out / name).parent.mkdir(parents=True)
    (run.out / name).write_text(DEEP)
    with pytest.raises(RunError) as e:
        run.options() if name == "options.json" else load_pairs(run)
    assert "nested deeper than 32 levels" in one_line(e.value)


def test_the_json_depth_check_ignores_brackets_in_strings(tmp_path):
    from t2f.files import read_json

    data = {"name": "[" * 1000 + "\\\"{" * 100, "list": [[[1]]]}
    (tmp_path / "ok.json").write_text(json.dumps(data))
    assert read_json(tmp_path / "ok.json") == data


class _Evil:
    """Pickles as a call of os.system: a checkpoint that would run code under torch.load(weights_only=False)."""

    def __reduce__(self):
        return os.system, ("true",)


@pytest.fixture
def tiny_clip_state(tiny_clip):
    return {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}


def test_a_clip_checkpoint_loads_through_the_restricted_unpickler(tmp_path, tiny_clip, tiny_clip_state):
    from safetensors.torch import save_file

    from t2f.clip import load_clip

    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in tiny_clip_state.items()}   # not the seed's weights
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "clip.pt")
    save_file(state, tmp_path / "clip.safetensors")
    for name in ("clip.pt", "clip.safetensors"):
        loaded = load_clip(f"t2f-tiny:{tmp_path / name}")
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
        assert loaded.name == f"t2f-tiny:{name}"


def test_a_clip_checkpoint_with_a_pickled_class_is_t2fs_own_line(tmp_path, tiny_clip_state):
    from t2f.clip import ClipLoadError, load_clip

    torch.save({"state_dict": tiny_clip_state, "extra": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ClipLoadError) as e:
        load_clip(f"t2f-tiny:{tmp_path / 'evil.pt'}")
    message = one_line(e.value)
    assert "refusing to load global 'posix.system'" in message and "weights files may not run code" in message
    assert "weights_only" not in message


def test_a_clip_checkpoint_that_does_not_fit_its_model_is_one_line(tmp_path, tiny_clip_state):
    from t2f.clip import ClipLoadError, load_clip

    state = dict(tiny_clip_state)
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(ClipLoadError) as e:
        load_clip(f"t2f-tiny:{tmp_path / 'short.pt'}")
    assert "its weights do not fit t2f-tiny (Missing key(s)" in one_line(e.value)


# ----------------------------------------------------------------------------
# 16. Inputs are read only if they are regular files: a FIFO is refused at once, never waited on.


@pytest.fixture
def fifo(tmp_path):
    """A FIFO that nobody writes to; a reader that opened it the blocking way would wait forever. The guard thread
    opens it for writing after 60 s, so a regression fails (wrong outcome) instead of hanging the suite."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    stop = threading.Event()

    def release():
        if not stop.wait(60):
            with open(path, "wb"):
                pass

    guard = threading.Thread(target=release, daemon=True)
    guard.start()
    yield path
    stop.set()
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_infer_refuses_a_fifo_as_image(tmp_path, fifo):
    from t2f.engine.cli import main as infer_main

    result = CliRunner().invoke(infer_main, [*TINY, "--mode", "image", "--image", str(fifo), "--out", str(tmp_path / "f.png")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--image" in errors[0] and "is a FIFO; t2f reads regular files only" in errors[0], result.output


def test_weights_refuse_a_fifo(tmp_path, fifo, tiny_generator):
    from t2f.weights import save_generator

    assert "not a regular file" in import_error(fifo)
    directory = save_generator(tiny_generator, tmp_path / "gen")
    os.replace(fifo, directory / "config.json")
    assert "config.json: is not a regular file" in import_error(directory)
    os.replace(directory / "config.json", fifo)


def test_library_readers_refuse_a_fifo(tmp_path, fifo):
    from t2f.clip import ClipLoadError, _model_from_checkpoint
    from t2f.files import InputPathError, read_json, sha256_file
    from t2f.unpickle import safe_load_checkpoint, safe_unpickle

    for read in (read_json, sha256_file, safe_unpickle, safe_load_checkpoint):
        with pytest.raises(InputPathError, match="is a FIFO; t2f reads regular files only"):
            read(fifo)
    with pytest.raises(ClipLoadError, match="not a regular file"):
        _model_from_checkpoint("t2f-tiny", str(fifo))


def test_train_says_a_fifo_options_file_is_not_read(tmp_path, fifo):
    from t2f.trainer.run import Run, RunError

    run = tmp_path / "run"
    run.mkdir()
    os.rename(fifo, run / "options.json")
    with pytest.raises(RunError) as e:
        Run(run).options()
    assert "options.json: cannot read (is a FIFO; t2f reads regular files only)" in one_line(e.value)
    os.rename(run / "options.json", fifo)
