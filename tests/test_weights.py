"""Safe weight import: NVIDIA pickles (persistence layout), rosinality checkpoints, converted directories."""

import json
import os
import pickle

import pytest
import torch

import t2f
from t2f.io import WeightsError
from t2f.presets import random_generator
from t2f.weights import import_generator, load_generator_dir, save_generator

from helpers import randomize, to_rosinality, write_nvidia_pickle


@pytest.fixture
def source_generator():
    return randomize(random_generator("tiny"), seed=3)


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "executed.txt"
    monkeypatch.setenv("T2F_TEST_MARKER", str(path))
    return path


def same_outputs(a, b):
    z = torch.randn(2, a.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, y = a(z, truncation_psi=0.7), b(z, truncation_psi=0.7)
    return torch.equal(x, y)


# ----------------------------------------------------------------------------
# NVIDIA pickles.


def test_nvidia_pickle_imports_without_running_its_code(source_generator, tmp_path, marker):
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(source_generator, path)
    assert b"T2F_TEST_MARKER" in path.read_bytes()  # the pickle really carries source code
    imported = t2f.load_generator(str(path))
    assert not marker.exists()
    assert imported.config == source_generator.config
    assert same_outputs(imported, source_generator)


def test_nvidia_pickle_with_conv_clamp_and_fp16_res(tmp_path):
    g = randomize(random_generator("tiny"))
    assert g.config.conv_clamp == 256 and g.config.num_fp16_res == 2
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(g, path)
    assert import_generator(path).config == g.config


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [_Evil(), {"G_ema": _Evil()}])
def test_malicious_pickle_is_refused(tmp_path, payload):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(WeightsError, match=r"refusing to load global '(posix|nt|os)\.system'"):
        import_generator(path)


def test_builtins_eval_is_refused(tmp_path):
    class Eval:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Eval()}, protocol=4))
    with pytest.raises(WeightsError, match=r"refusing to load global 'builtins\.eval'"):
        import_generator(path)


def test_truncated_pickle(source_generator, tmp_path):
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(source_generator, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        import_generator(path)


def test_unmatched_and_missing_tensors_are_named(source_generator, tmp_path):
    path = tmp_path / "extra.pkl"
    write_nvidia_pickle(source_generator, path, extra_tensors={"mystery": torch.zeros(3)})
    with pytest.raises(WeightsError, match="unmatched tensors in the pickle: mystery"):
        import_generator(path)
    path = tmp_path / "missing.pkl"
    write_nvidia_pickle(source_generator, path, drop="synthesis.b8.conv0.weight")
    with pytest.raises(WeightsError, match="missing synthesis.b8.conv0.weight"):
        import_generator(path)


def test_config_that_does_not_match_the_weights(source_generator, tmp_path):
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(source_generator, path, init_overrides=dict(w_dim=64))
    with pytest.raises(WeightsError, match="do not match"):
        import_generator(path)


@pytest.mark.parametrize("override,message", [
    (dict(c_dim=10), "conditional generators"),
    (dict(synthesis_kwargs=dict(architecture="resnet")), "skip"),
    (dict(mapping_kwargs=dict(num_layers=2, mystery=1)), "unsupported generator options"),
])
def test_unsupported_networks(source_generator, tmp_path, override, message):
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(source_generator, path, init_overrides=override)
    with pytest.raises(WeightsError, match=message):
        import_generator(path)


def _g_ema_record(generator, path):
    """`generator` written as an NVIDIA pickle at `path`, and its G_ema record as the safe unpickler reads it back."""
    from t2f.weights import safe_unpickle

    write_nvidia_pickle(generator, path)
    return safe_unpickle(path)["G_ema"]


def test_stylegan3_is_refused(source_generator, tmp_path):
    from t2f.weights import PersistentRecord, convert_nvidia

    record = _g_ema_record(source_generator, tmp_path / "network.pkl")
    # StyleGAN3's synthesis network starts with an `input` layer (Fourier features).
    record.state["_modules"]["synthesis"].state["_modules"]["input"] = PersistentRecord("SynthesisInput", {"_parameters": {"freqs": torch.zeros(1)}})
    with pytest.raises(WeightsError, match="StyleGAN3"):
        convert_nvidia(record, "sg3.pkl")


def test_pickle_without_g_ema(tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"D": torch.zeros(1)}))
    with pytest.raises(WeightsError, match="no 'G_ema'"):
        import_generator(path)


# ----------------------------------------------------------------------------
# rosinality checkpoints.


def test_rosinality_checkpoint(source_generator, tmp_path):
    state = to_rosinality(source_generator)
    latent_avg = state.pop("latent_avg")
    path = tmp_path / "550000.pt"
    torch.save({"g_ema": state, "latent_avg": latent_avg}, path)
    imported = t2f.load_generator(path)
    cfg = source_generator.config
    assert imported.config == type(cfg)(**dict(cfg.to_dict(), num_fp16_res=0, conv_clamp=None))
    # rosinality networks have no clamp and no fp16 resolutions: compare with the unclamped twin.
    twin = type(source_generator)(imported.config).eval()
    twin.load_state_dict(source_generator.state_dict())
    assert same_outputs(imported, twin)


def test_rosinality_needs_latent_avg(source_generator, tmp_path):
    state = to_rosinality(source_generator)
    state.pop("latent_avg")
    path = tmp_path / "train.pt"
    torch.save({"g_ema": state}, path)
    with pytest.raises(WeightsError, match="latent_avg"):
        import_generator(path)


class Foreign:
    pass


def test_rosinality_checkpoint_with_foreign_global(source_generator, tmp_path):
    state = to_rosinality(source_generator)
    path = tmp_path / "bad.pt"
    torch.save({"g_ema": state, "latent_avg": state.pop("latent_avg"), "extra": Foreign()}, path)
    with pytest.raises(WeightsError, match="refusing to load global 'test_weights.Foreign': weights files may not run code") as e:
        import_generator(path)
    assert "weights_only" not in str(e.value)                # never the advice to turn the safety off


def test_rosinality_unmatched_tensor(source_generator, tmp_path):
    state = to_rosinality(source_generator)
    state["style.9.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pt"
    torch.save({"g_ema": state, "latent_avg": state.pop("latent_avg")}, path)
    with pytest.raises(WeightsError, match="unmatched tensors in the checkpoint: style.9.weight"):
        import_generator(path)


# ----------------------------------------------------------------------------
# Converted directories.


def test_directory_round_trip(source_generator, tmp_path):
    out = save_generator(source_generator, tmp_path / "g")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert same_outputs(load_generator_dir(out), source_generator)
    with pytest.raises(FileExistsError):
        save_generator(source_generator, out)


def test_directory_config_mismatch(source_generator, tmp_path):
    out = save_generator(source_generator, tmp_path / "g")
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["channel_max"] = 64
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="do not match the config: .*wrong shape"):
        load_generator_dir(out)


def test_directory_truncated_weights(source_generator, tmp_path):
    out = save_generator(source_generator, tmp_path / "g")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_generator_dir(out)


def test_directory_corrupt_config(source_generator, tmp_path):
    out = save_generator(source_generator, tmp_path / "g")
    (out / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_generator_dir(out)


def test_missing_source(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        t2f.load_generator(tmp_path / "nothing.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty file"):
        t2f.load_generator(tmp_path / "empty.pkl")
    (tmp_path / "text.pkl").write_bytes(b"hello world")
    with pytest.raises(WeightsError, match="not a pickle"):
        t2f.load_generator(tmp_path / "text.pkl")


# ----------------------------------------------------------------------------
# Layouts real pickles have, and crafted ones.


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_pickle_protocols(source_generator, tmp_path, protocol):
    """Python 3.7-era pickles (protocol <= 3) write each module's set() as a global."""
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(source_generator, path, protocol=protocol)
    assert same_outputs(import_generator(path), source_generator)


def test_legacy_converter_kwargs(source_generator, tmp_path):
    """NVIDIA's legacy.py (TF -> PyTorch) writes every option explicitly, activations included."""
    cfg = source_generator.config
    kwargs = dict(z_dim=cfg.z_dim, c_dim=0, w_dim=cfg.w_dim, img_resolution=cfg.resolution, img_channels=3,
                  mapping_kwargs=dict(num_layers=cfg.mapping_layers, embed_features=None, layer_features=None,
                                      activation="lrelu", lr_multiplier=0.01, w_avg_beta=0.995),
                  synthesis_kwargs=dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=2,
                                        conv_clamp=256, architecture="skip", resample_filter=[1, 3, 3, 1],
                                        use_noise=True, activation="lrelu"))
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(source_generator, path, init_kwargs=kwargs)
    assert import_generator(path).config == source_generator.config


def test_stylegan3_release_stylegan2_layout(source_generator, tmp_path):
    """stylegan3-release's StyleGAN2 takes synthesis options at the top level; num_fp16_res defaults to 4."""
    cfg = source_generator.config
    kwargs = dict(z_dim=cfg.z_dim, c_dim=0, w_dim=cfg.w_dim, img_resolution=cfg.resolution, img_channels=3,
                  mapping_kwargs=dict(num_layers=cfg.mapping_layers), channel_base=cfg.channel_base,
                  channel_max=cfg.channel_max, conv_clamp=256, fused_modconv_default="inference_only")
    path = tmp_path / "network.pkl"
    write_nvidia_pickle(source_generator, path, init_kwargs=kwargs)
    imported = import_generator(path)
    assert imported.config.conv_clamp == 256 and imported.config.num_fp16_res == 4
    kwargs["mystery_option"] = 1
    write_nvidia_pickle(source_generator, path, init_kwargs=kwargs)
    with pytest.raises(WeightsError, match="unsupported generator options"):
        import_generator(path)


class _ForgedDtype:
    def __init__(self, spec, state):
        self.spec, self.state = spec, state

    def __reduce__(self):
        import numpy as np

        return (np.dtype, (self.spec, False, True), self.state)


@pytest.mark.parametrize("spec,state,message", [
    ("V16", (3, "|", None, ("b",), {"b": ("<f8", 2**40)}, 16, 1, 16), "only plain numeric numpy dtypes"),
    ("f8", (3, "|", None, ("b",), {"b": ("<f8", 2**40)}, 16, 1, 16), "refusing to set state on a"),
])
def test_forged_numpy_dtypes_are_refused(tmp_path, spec, state, message):
    path = tmp_path / "forged.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _ForgedDtype(spec, state)}, protocol=4))
    with pytest.raises(WeightsError, match=message):
        import_generator(path)


def test_malformed_contents_give_weights_errors(source_generator, tmp_path):
    from t2f.weights import convert_nvidia

    path = tmp_path / "network.pkl"
    record = _g_ema_record(source_generator, path)
    record.state["_modules"]["mapping"].state["_parameters"] = ["not", "a", "dict"]
    with pytest.raises(WeightsError, match="_parameters is not a mapping"):
        convert_nvidia(record, "network.pkl")
    write_nvidia_pickle(source_generator, path, init_overrides=dict(mapping_kwargs=["num_layers", 2]))
    with pytest.raises(WeightsError, match="malformed generator init_kwargs"):
        import_generator(path)


def test_written_files_get_the_usual_permissions(source_generator, tmp_path):
    old = os.umask(0o022)
    try:
        out = save_generator(source_generator, tmp_path / "g")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)


# ----------------------------------------------------------------------------
# The same tensors and metadata give the same file bytes in every process (banks and pair shards carry metadata).

_BYTES_OF = """
import hashlib, sys, torch
from t2f.io import safetensors_bytes
tensors = {"embeddings": torch.arange(12, dtype=torch.float16).reshape(3, 4), "a": torch.ones(2)}
metadata = {"kind": "t2f-bank", "clip": "tiny", "clip_fingerprint": "0123456789abcdef", "zeta": "z"}
sys.stdout.write(hashlib.sha256(safetensors_bytes(tensors, metadata)).hexdigest())
"""


def test_safetensors_bytes_sorts_the_metadata_and_keeps_the_file_valid():
    import struct

    from safetensors.torch import load

    from t2f.io import safetensors_bytes

    tensors = {"embeddings": torch.arange(12, dtype=torch.float16).reshape(3, 4), "a": torch.ones(2)}
    metadata = {"kind": "t2f-bank", "clip": "tiny", "clip_fingerprint": "0123456789abcdef", "zeta": "z"}
    data = safetensors_bytes(tensors, metadata)
    size = struct.unpack("<Q", data[:8])[0]
    assert list(json.loads(data[8:8 + size])["__metadata__"]) == sorted(metadata)
    loaded = load(data)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.slow
def test_safetensors_bytes_are_the_same_in_every_process():
    """safetensors writes its metadata in a hash map's order, which differs from process to process: t2f's writes
    do not (a bank or a shard written twice is the same file)."""
    import subprocess
    import sys

    runs = [subprocess.Popen([sys.executable, "-c", _BYTES_OF], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    digests = {run.communicate(timeout=120)[0] for run in runs}
    assert len(digests) == 1 and len(digests.pop()) == 64
