"""Regenerate tests/data/golden-*: NVIDIA's reference outputs for small random StyleGAN2 networks.

Needs a local checkout of NVIDIA's stylegan2-ada-pytorch (not part of t2f, never committed):

    python tests/make_golden.py /path/to/stylegan2-ada-pytorch

For each case it builds NVIDIA's `Generator` with random weights (biases, noise strengths and
w_avg randomized too, so every term matters), pickles it the way NVIDIA's training loop does,
imports that pickle with t2f's safe importer into tests/data/golden-NAME/ (config.json +
model.safetensors), and stores NVIDIA's own mapping and synthesis outputs (fp32, constant
noise and no noise) in expected.safetensors. tests/test_stylegan2.py compares against them.
"""

import pickle
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CASES = {
    # name: (resolution, z/w dim, mapping layers, channel_base, channel_max, num_fp16_res, conv_clamp, psi, cutoff)
    "r32": (32, 64, 4, 512, 64, 0, None, 0.7, None),
    "r32-clamp": (32, 64, 2, 512, 64, 0, 0.5, 1.0, None),
    "r64-fp16res-cutoff": (64, 48, 3, 1024, 32, 2, 256, 0.5, 3),
}


def main(nvidia_repo: str) -> None:
    sys.path.insert(0, nvidia_repo)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.networks import Generator as NvidiaGenerator  # noqa: E402

    from t2f.weights import load_nvidia_pickle, save_generator  # noqa: E402

    out_root = Path(__file__).parent / "data"
    for i, (name, (res, dim, layers, cbase, cmax, fp16res, clamp, psi, cutoff)) in enumerate(CASES.items()):
        torch.manual_seed(1000 + i)
        G = NvidiaGenerator(z_dim=dim, c_dim=0, w_dim=dim, img_resolution=res, img_channels=3,
                            mapping_kwargs=dict(num_layers=layers),
                            synthesis_kwargs=dict(channel_base=cbase, channel_max=cmax, num_fp16_res=fp16res, conv_clamp=clamp)).eval()
        with torch.no_grad():
            for pname, p in G.named_parameters():
                if pname.endswith("noise_strength") or pname.endswith(".bias"):
                    p.copy_(torch.randn_like(p) * 0.3)
            G.mapping.w_avg.copy_(torch.randn_like(G.mapping.w_avg))
            z = torch.randn([3, dim])
            ws = G.mapping(z, None, truncation_psi=psi, truncation_cutoff=cutoff)
            img_const = G.synthesis(ws, noise_mode="const", force_fp32=True)
            img_none = G.synthesis(ws, noise_mode="none", force_fp32=True)
        with tempfile.TemporaryDirectory() as tmp:
            pkl = Path(tmp) / "network.pkl"
            with open(pkl, "wb") as f:
                pickle.dump(dict(G=G, G_ema=G, training_set_kwargs=None), f)
            ours = load_nvidia_pickle(pkl)
        case_dir = out_root / f"golden-{name}"
        save_generator(ours, case_dir, overwrite=True, source="NVIDIA stylegan2-ada-pytorch Generator, random weights")
        save_file({"z": z, "psi": torch.tensor(psi), "cutoff": torch.tensor(-1 if cutoff is None else cutoff),
                   "ws": ws.contiguous(), "img_const": img_const.contiguous(), "img_none": img_none.contiguous()},
                  str(case_dir / "expected.safetensors"))
        print(f"wrote {case_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/make_golden.py /path/to/stylegan2-ada-pytorch")
    main(sys.argv[1])
