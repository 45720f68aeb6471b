"""`t2f-infer`: prompts -> a grid of faces (a row per prompt)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
import warnings

import click
import numpy as np

from t2f.stylegan2 import NOISE_MODES

MAX_N = 64                # Images per prompt.
MAX_IMAGES = 256          # Images per run.
RANDOM_PRESET = "tiny"


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def _check_writable(path: str, param: str) -> None:
    """Refuse an output whose nearest existing ancestor directory is not writable."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise click.BadParameter(f"cannot write to {parent}", param_hint=param)
    if os.path.isdir(path) and param != "--save-images":
        raise click.BadParameter(f"{path} is a directory", param_hint=param)


def _png_bytes(array: np.ndarray, info: dict) -> bytes:
    import PIL.Image
    import PIL.PngImagePlugin

    meta = PIL.PngImagePlugin.PngInfo()
    meta.add_text("t2f", json.dumps(info, sort_keys=True))
    mode = "L" if array.shape[-1] == 1 else "RGB"
    buf = io.BytesIO()
    PIL.Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode).save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    from t2f.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[rows * cols, H, W, C] -> [rows * H, cols * W, C]."""
    _, h, w, c = images.shape
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


@contextlib.contextmanager
def _quiet_libraries():
    """Keep third-party logging (open_clip, huggingface_hub) off the terminal; errors are ours to report."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.argument("prompts",      nargs=-1, required=True, metavar="PROMPT...")
@click.option("--n",            help="Images per prompt", metavar="INT", type=click.IntRange(1, MAX_N), default=4, show_default=True)
@click.option("--seed",         help="Random seed", metavar="INT", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--truncation",   help="Truncation psi (1 = none)", metavar="FLOAT", type=click.FloatRange(-1, 2), callback=_finite, default=0.7, show_default=True)
@click.option("--noise-mode",   help="Noise inputs", type=click.Choice(NOISE_MODES), default="const", show_default=True)
@click.option("--out",          help="Grid PNG, a row per prompt", metavar="PNG", type=click.Path(dir_okay=False), default="faces.png", show_default=True)
@click.option("--save-images",  help="Also write one PNG per image here", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--save-ws",      help="Also save the ws [images, num_ws, w_dim]", metavar="NPY", type=click.Path(dir_okay=False))
@click.option("--generator",    help="Generator preset, directory, NVIDIA .pkl or rosinality .pt", metavar="NAME|PATH", default="ffhq-1024", show_default=True)
@click.option("--clip",         help="open_clip MODEL:TAG, MODEL:/path/to/checkpoint, or tiny", metavar="SPEC", default="ViT-B-32:openai", show_default=True)
@click.option("--mapper",       help="Mapper directory, or tiny (random weights)", metavar="DIR|NAME")
@click.option("--device",       help="auto, cpu, cuda or cuda:N", metavar="STR", default="auto", show_default=True)
@click.option("--precision",    help="Compute precision (fp16 needs CUDA)", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--batch",        help="Images synthesized at once", metavar="INT", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--cache",        help="Download cache [default: $T2F_CACHE or ~/.cache/t2f]", metavar="DIR", type=click.Path(file_okay=False))
def main(prompts, n, seed, truncation, noise_mode, out, save_images, save_ws, generator, clip, mapper, device, precision, batch, cache):
    """Generate faces from text prompts.

    \b
    Examples:
    # Offline smoke run on the CPU with random-weight tiny models (not a trained model):
    t2f-infer --generator tiny --clip tiny --mapper tiny "a smiling woman"

    \b
    # FFHQ 1024 with ViT-B-32, 4 faces per prompt, a row per prompt:
    t2f-infer "a photo of an old man with white hair" "a smiling woman" \\
        --mapper runs/ffhq --n 4 --seed 0 --truncation 0.7 --out faces.png
    """
    from t2f import ClipLoadError, DownloadError, WeightsError
    from .pipeline import MissingMapperError, load_pipeline, resolve_device

    prompts = [p.strip() for p in prompts]
    if any(not p for p in prompts):
        raise click.BadParameter("prompts must not be empty or whitespace", param_hint="PROMPT")
    if len(prompts) * n > MAX_IMAGES:
        raise click.BadParameter(f"{len(prompts)} prompts x {n} images is more than {MAX_IMAGES} images per run", param_hint="--n")
    try:
        resolved = resolve_device(device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    if precision == "fp16" and resolved.type != "cuda":
        raise click.BadParameter("fp16 needs a CUDA device; use --precision fp32 on the CPU", param_hint="--precision")
    for path, param in ((out, "--out"), (save_images, "--save-images"), (save_ws, "--save-ws")):
        if path is not None:
            _check_writable(path, param)

    random_parts = [f"--{name} {value}" for name, value in (("generator", generator), ("clip", clip), ("mapper", mapper))
                    if value == RANDOM_PRESET and not os.path.exists(value)]
    if random_parts:
        click.echo(f"note: random weights ({', '.join(random_parts)}): not a trained model, the images are not faces", err=True)

    start = time.perf_counter()
    try:
        with _quiet_libraries(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = load_pipeline(generator=generator, clip=clip, mapper=mapper, device=str(resolved), precision=precision,
                                 batch_size=batch, cache=cache)
            faces = pipe(prompts, n=n, seed=seed, truncation_psi=truncation, noise_mode=noise_mode)
    except (WeightsError, DownloadError, ClipLoadError, MissingMapperError, ValueError) as e:
        raise click.ClickException(" ".join(str(e).split())) from None
    for w in caught:
        if "truncated" in str(w.message):
            click.echo(f"warning: {w.message}", err=True)
    elapsed = time.perf_counter() - start

    # All computed: now write, each file atomically.
    images = faces.images.numpy()
    info = dict(prompts=prompts, n=n, seed=seed, truncation=truncation, noise_mode=noise_mode,
                generator=generator, clip=clip, mapper=mapper, precision=precision, device=str(resolved))
    _write_bytes(out, _png_bytes(_grid(images, len(prompts), n), info))
    if save_images is not None:
        os.makedirs(save_images, exist_ok=True)
        for i, image in enumerate(images):
            p, s = divmod(i, n)
            _write_bytes(os.path.join(save_images, f"p{p:03d}_s{s:03d}.png"), _png_bytes(image, dict(info, prompt=prompts[p], sample=s)))
    if save_ws is not None:
        buf = io.BytesIO()
        np.save(buf, faces.ws.numpy())
        _write_bytes(save_ws, buf.getvalue())
    h, w = images.shape[1:3]
    click.echo(f"wrote {out}: {len(prompts)} prompt(s) x {n} image(s) at {w}x{h} in {elapsed:.2f} s on {resolved} ({precision})")


if __name__ == "__main__":
    main()
