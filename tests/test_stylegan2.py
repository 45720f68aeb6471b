"""The StyleGAN2 port: faithfulness to NVIDIA's reference outputs, config, determinism, precision."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2f.precision import Precision
from t2f.presets import GENERATOR_ARCHS, random_generator
from t2f.stylegan2 import Generator, GeneratorConfig, to_uint8, truncate
from t2f.weights import load_generator_dir

from helpers import randomize

DATA = Path(__file__).parent / "data"
GOLDEN = sorted(p.name for p in DATA.glob("golden-*"))


def test_golden_cases_present():
    assert len(GOLDEN) == 3


@pytest.mark.parametrize("case", GOLDEN)
def test_matches_nvidia_reference(case):
    """fp32 outputs match NVIDIA's stylegan2-ada-pytorch Generator (tests/make_golden.py) to 1e-5 relative."""
    generator = load_generator_dir(DATA / case)
    expected = load_file(str(DATA / case / "expected.safetensors"))
    cutoff = int(expected["cutoff"])
    with torch.no_grad():
        ws = generator.mapping(expected["z"], truncation_psi=float(expected["psi"]), truncation_cutoff=None if cutoff < 0 else cutoff)
        img_const = generator.synthesis(expected["ws"], noise_mode="const")
        img_none = generator.synthesis(expected["ws"], noise_mode="none")
    for ours, ref in ((ws, expected["ws"]), (img_const, expected["img_const"]), (img_none, expected["img_none"])):
        assert ours.shape == ref.shape
        assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5
    # The cases differ where they should: the noise term and (in r32-clamp) the clamp are live.
    assert (img_const - img_none).abs().max() > 1e-3


def test_clamp_case_is_clamped():
    """In golden-r32-clamp the clamp changes the output, so matching NVIDIA there checks the clamp."""
    clamped = load_generator_dir(DATA / "golden-r32-clamp")
    unclamped = Generator(GeneratorConfig.from_dict(dict(clamped.config.to_dict(), conv_clamp=None)))
    unclamped.load_state_dict(clamped.state_dict())
    ws = load_file(str(DATA / "golden-r32-clamp" / "expected.safetensors"))["ws"]
    with torch.no_grad():
        assert ((clamped.synthesis(ws) - unclamped.synthesis(ws)).norm() / unclamped.synthesis(ws).norm()) > 0.1


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if GENERATOR_ARCHS[name].resolution >= 1024 else name
                                  for name in sorted(GENERATOR_ARCHS)])
def test_shapes(name):
    g = random_generator(name)
    cfg = g.config
    ws = g.mapping(torch.randn(1, cfg.z_dim))
    assert ws.shape == (1, cfg.num_ws, cfg.w_dim) and g.num_ws == cfg.num_ws
    with torch.no_grad():
        img = g.synthesis(ws)
    assert img.shape == (1, cfg.img_channels, cfg.resolution, cfg.resolution) and img.dtype == torch.float32


@pytest.mark.parametrize("resolution,num_ws", [(4, 2), (32, 8), (1024, 18)])
def test_num_ws(resolution, num_ws):
    assert GeneratorConfig(resolution=resolution).num_ws == num_ws


@pytest.mark.parametrize("bad", [dict(resolution=48), dict(resolution=2), dict(z_dim=0), dict(conv_clamp=-1.0),
                                 dict(num_fp16_res=-1), dict(conv_clamp=float("nan"))])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        GeneratorConfig(**bad)


def test_config_round_trip_refuses_unknown_keys():
    cfg = GeneratorConfig(resolution=64, conv_clamp=256.0)
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        GeneratorConfig.from_dict(dict(cfg.to_dict(), architecture="resnet"))


def test_truncation():
    g = torch.Generator().manual_seed(0)
    w_avg, ws = torch.randn(8, generator=g), torch.randn(3, 4, 8, generator=g)
    assert torch.allclose(truncate(ws, w_avg, 0.0), w_avg.expand(3, 4, 8))
    assert torch.equal(truncate(ws, w_avg, 1.0), ws)
    half = truncate(ws, w_avg, 0.5, cutoff=2)
    # lerp rounds differently from (a + b) / 2: a few ulps, absolute where the mean is near 0
    assert torch.allclose(half[:, :2], (ws[:, :2] + w_avg) / 2, atol=1e-6) and torch.equal(half[:, 2:], ws[:, 2:])


def test_no_random_numbers_in_const_and_none_modes(tiny_generator, monkeypatch):
    ws = tiny_generator.mapping(torch.randn(2, tiny_generator.z_dim))

    def forbidden(*args, **kwargs):
        raise AssertionError("random numbers drawn in forward")

    for fn in ("randn", "rand", "randn_like", "rand_like", "normal"):
        monkeypatch.setattr(torch, fn, forbidden)
    a = tiny_generator.synthesis(ws, noise_mode="const")
    b = tiny_generator.synthesis(ws, noise_mode="const")
    tiny_generator.synthesis(ws, noise_mode="none")
    assert torch.equal(a, b)


def test_random_noise_mode(tiny_generator):
    g = randomize(random_generator("tiny"))
    ws = g.mapping(torch.randn(2, g.z_dim))
    torch.manual_seed(1)
    a = g.synthesis(ws, noise_mode="random")
    torch.manual_seed(1)
    b = g.synthesis(ws, noise_mode="random")
    c = g.synthesis(ws, noise_mode="random")
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="noise_mode"):
        g.synthesis(ws, noise_mode="fixed")


def test_fp16_precision_runs_the_fp16_blocks_in_half():
    g = randomize(random_generator("tiny"))
    ws = g.mapping(torch.randn(2, g.z_dim))
    seen = {}
    hooks = [getattr(g.synthesis, f"b{r}").conv1.register_forward_hook(lambda m, i, o, r=r: seen.__setitem__(r, o.dtype))
             for r in g.config.block_resolutions]
    full = g.synthesis(ws)
    assert set(seen.values()) == {torch.float32}           # fp16 ws do not switch precision: it is passed explicitly
    assert torch.equal(g.synthesis(ws.half().float()), g.synthesis(ws.half()))
    half = g.synthesis(ws, precision=Precision.FP16)
    for h in hooks:
        h.remove()
    assert g.config.fp16_resolution == 32
    assert {r: d for r, d in seen.items()} == {4: torch.float32, 8: torch.float32, 16: torch.float32,
                                              32: torch.float16, 64: torch.float16}
    assert half.dtype == torch.float32
    assert ((half - full).norm() / full.norm()).item() < 1e-2


def test_fp16_keeps_ws_and_affine_layers_in_fp32():
    """NVIDIA keeps ws in fp32 in every block: each affine layer sees its ws row unrounded, also in fp16."""
    g = randomize(random_generator("tiny"))
    ws = g.mapping(torch.randn(2, g.z_dim)) + 1e-3 * torch.randn(2, g.num_ws, g.w_dim)   # not representable in fp16
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
             for name, m in g.synthesis.named_modules() if name.endswith("affine")]
    g.synthesis(ws, precision=Precision.FP16)
    for h in hooks:
        h.remove()
    assert len(seen) == 3 * len(g.config.block_resolutions) - 1
    assert all(s.dtype == torch.float32 and any(torch.equal(s, ws[:, i]) for i in range(g.num_ws)) for s in seen)


def test_uint8_conversion():
    img = torch.tensor([-1.0, -0.5, 0.0, 0.999, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8(img)
    assert out.shape == (1, 1, 5, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]


def test_synthesis_exports_to_onnx_with_a_dynamic_batch(tmp_path):
    """The export-friendly claim, checked: TorchScript-exporter ONNX, run in ONNX Runtime at another batch size."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx

    g = randomize(random_generator("tiny"))

    class Synthesis(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.synthesis = g.synthesis

        def forward(self, ws):
            return self.synthesis(ws, noise_mode="const")

    path = tmp_path / "synthesis.onnx"
    ws = g.mapping(torch.randn(2, g.z_dim))
    torch.onnx.export(Synthesis().eval(), (ws,), str(path), input_names=["ws"], output_names=["image"],
                      dynamic_axes={"ws": {0: "batch"}, "image": {0: "batch"}}, opset_version=17, dynamo=False)
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ws5 = g.mapping(torch.randn(5, g.z_dim))
    out = torch.from_numpy(session.run(None, {"ws": ws5.numpy()})[0])
    ref = g.synthesis(ws5).detach()
    assert out.shape == ref.shape == (5, 3, 64, 64)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
