"""What tests share besides fixtures: the in-process CLI runner and its error-line check, the tiny models'
options and pipeline, NVIDIA- and rosinality-layout weights crafted without their code, HTTP on loopback, and a
child process holding a lock."""

from __future__ import annotations

import collections
import contextlib
import http.client
import pathlib
import pickle
import socket
import subprocess
import sys
import types

import torch
from click.testing import CliRunner

from t2f.presets import TINY as _TINY
from t2f.stylegan2 import FullyConnected, Generator, fir_filter

# ----------------------------------------------------------------------------
# Command lines, run in-process.

TINY = ["--generator", _TINY, "--clip", _TINY, "--mapper", _TINY]      # every command's options for the tiny models


def invoke(main, args, expect=None):
    """Run click command `main` with `args` (each passed through str); exceptions propagate.

    expect: the exit code the command must return (None: not checked).
    """
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    return result


def assert_one_error_line(result, code, *fragments) -> str:
    """The command exited with `code` and printed exactly one `Error` line, holding every fragment, and no traceback."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------
# The tiny random-weight pipeline.


def tiny_pipeline(device="cpu", precision="fp32", batch_size=8):
    from t2f.engine import load_pipeline

    return load_pipeline("tiny", device=device, backend="torch", precision=precision, batch_size=batch_size)


def tiny_run(directory, generator_name: str = _TINY, clip_name: str = _TINY, seed: int = 1, **record):
    """A mapper directory as t2f-train's fit writes it, recording the tiny generator and CLIP's fingerprints under the
    given names; its weights are random from `seed` (not the `tiny` mapper's). `record` replaces whole entries
    (generator=..., clip=...) of config.json."""
    from t2f.clip import load_clip
    from t2f.io import fingerprint
    from t2f.mapper import save_mapper
    from t2f.presets import random_generator, random_mapper

    g, c = random_generator(), load_clip(_TINY)
    mapper = random_mapper(g, c.embed_dim, seed=seed)
    records = dict(generator=dict(name=generator_name, fingerprint=fingerprint(g)), clip=dict(name=clip_name, fingerprint=c.fingerprint))
    return save_mapper(mapper, directory, **{**records, **record})


def tiny_clip_variant(name: str):
    """load_clip of the tiny open_clip config tests/data/clip_configs/t2f-tiny-NAME.json (random weights; "tiny": t2f's
    own). The configs are registered with open_clip on first use, for this process only."""
    import open_clip

    from t2f.clip import load_clip

    if name == _TINY:
        return load_clip(_TINY)
    if f"t2f-tiny-{name}" not in open_clip.list_models():
        open_clip.add_model_config(pathlib.Path(__file__).parent / "data" / "clip_configs")
    return load_clip(f"t2f-tiny-{name}:random")


def randomize(generator: Generator, seed: int = 0) -> Generator:
    """Give biases, noise strengths and w_avg random values so every term of the network matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in generator.named_parameters():
            if name.endswith(".bias") or name.endswith("noise_strength"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        generator.mapping.w_avg.copy_(torch.randn(generator.w_dim, generator=g))
    return generator


# ----------------------------------------------------------------------------
# NVIDIA persistence layout, rebuilt for tests.

# The source text a real NVIDIA pickle would carry. If an importer ever executed it, the
# marker file named in T2F_TEST_MARKER would appear; tests check that it never does.
EVIL_MODULE_SRC = "import os\nopen(os.environ.get('T2F_TEST_MARKER', '/dev/null'), 'w').write('executed')\n"


class FakeNvidia:
    """Registers stand-ins for `torch_utils.persistence` and `dnnlib.util` while a pickle is written."""

    def __enter__(self):
        persistence = types.ModuleType("torch_utils.persistence")
        dnnlib_util = types.ModuleType("dnnlib.util")

        def _reconstruct_persistent_obj(meta):  # pragma: no cover - only referenced by name in pickles
            raise AssertionError("never called")

        class EasyDict(dict):
            pass

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        EasyDict.__module__ = "dnnlib.util"
        EasyDict.__qualname__ = "EasyDict"
        persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
        dnnlib_util.EasyDict = EasyDict
        self.modules = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                        "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": dnnlib_util}
        self.saved = {k: sys.modules.get(k) for k in self.modules}
        sys.modules.update(self.modules)
        self.reconstruct, self.EasyDict = _reconstruct_persistent_obj, EasyDict
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Record:
    """One persistent object of an NVIDIA pickle: pickles as `_reconstruct_persistent_obj(meta)`."""

    def __init__(self, fake, class_name, state):
        self.fake, self.class_name, self.state = fake, class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=4, module_src=EVIL_MODULE_SRC, class_name=self.class_name, state=self.state)
        return (self.fake.reconstruct, (meta,))


def _record(fake, module: torch.nn.Module, init_kwargs=None) -> Record:
    params = collections.OrderedDict((k, torch.nn.Parameter(v.detach().clone(), requires_grad=False)) for k, v in module._parameters.items())
    buffers = collections.OrderedDict((k, v.clone()) for k, v in module._buffers.items()
                                      if v is not None and k not in module._non_persistent_buffers_set)
    if type(module).__name__ in ("SynthesisLayer", "SynthesisBlock"):
        buffers["resample_filter"] = fir_filter()  # NVIDIA keeps the FIR filter as a buffer
    children = collections.OrderedDict((k, _record(fake, m)) for k, m in module._modules.items())
    # The attributes every nn.Module pickles with, a set among them (a global in protocols <= 3).
    state = {"training": False, "_parameters": params, "_buffers": buffers, "_non_persistent_buffers_set": set(),
             "_forward_hooks": collections.OrderedDict(), "_modules": children}
    if isinstance(module, FullyConnected):
        state["weight_gain"] = module.weight_gain
    if init_kwargs is not None:
        state["_init_args"] = ()
        state["_init_kwargs"] = init_kwargs
    return Record(fake, type(module).__name__, state)


def nvidia_init_kwargs(generator: Generator, easydict=dict, **overrides) -> dict:
    cfg = generator.config
    kwargs = dict(z_dim=cfg.z_dim, c_dim=0, w_dim=cfg.w_dim, img_resolution=cfg.resolution, img_channels=cfg.img_channels,
                  mapping_kwargs=easydict(num_layers=cfg.mapping_layers),
                  synthesis_kwargs=easydict(channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                                            num_fp16_res=cfg.num_fp16_res, conv_clamp=cfg.conv_clamp))
    kwargs.update(overrides)
    return easydict(kwargs)


def write_nvidia_pickle(generator: Generator, path, init_overrides=None, extra_tensors=None, drop=None, protocol=4,
                        init_kwargs=None) -> None:
    """Pickle `generator` in the layout of NVIDIA's network pickles ({'G_ema': persistent Generator, ...})."""
    with FakeNvidia() as fake:
        kwargs = fake.EasyDict(init_kwargs) if init_kwargs is not None else nvidia_init_kwargs(generator, fake.EasyDict, **(init_overrides or {}))
        record = _record(fake, generator, kwargs)
        if extra_tensors:
            record.state["_buffers"].update(extra_tensors)
        if drop:
            parent, _, leaf = drop.rpartition(".")
            node = record
            for part in parent.split("."):
                node = node.state["_modules"][part]
            node.state["_parameters"].pop(leaf, None)
            node.state["_buffers"].pop(leaf, None)
        data = dict(G=None, D=None, G_ema=record, training_set_kwargs=fake.EasyDict(resolution=generator.resolution))
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)


# ----------------------------------------------------------------------------
# rosinality's layout.


def to_rosinality(generator: Generator) -> dict:
    """Our generator's tensors under rosinality's names and layouts (the inverse of the import table)."""
    from t2f.weights import _rosinality_name_table

    table, filters = _rosinality_name_table(generator.config)
    state = generator.state_dict()
    out = {}
    for ours, (theirs, shape) in table.items():
        tensor = state[ours]
        if theirs.endswith(".conv.weight") or theirs == "input.input" or theirs.startswith("noises."):
            tensor = tensor.unsqueeze(0)
            if theirs.startswith("noises."):
                tensor = tensor.unsqueeze(0)
        elif theirs.endswith(".noise.weight"):
            tensor = tensor.reshape(1)
        elif theirs.startswith("to_rgb") and theirs.endswith(".bias") and ".modulation." not in theirs:
            tensor = tensor.reshape(1, -1, 1, 1)
        out[theirs] = tensor.clone()
    for name in filters:
        out[name] = fir_filter() * 4
    return out


# ----------------------------------------------------------------------------
# HTTP on loopback.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 120) -> tuple[int, bytes]:
    """(status, body) of one raw HTTP request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ----------------------------------------------------------------------------
# Another process holding something (a lock) while a test runs.


@contextlib.contextmanager
def child_holding(argv: list[str], **popen):
    """A child process `argv` that prints "held" once it holds what it was started to hold and keeps it until its
    standard input closes: started, waited for until it says "held", and ended (input closed, waited for) after the
    block. `popen`: more subprocess.Popen arguments (pass_fds, cwd)."""
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen)
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        child.stdin.close()
        child.wait()
