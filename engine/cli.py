"""`t2f-infer`: prompts -> a grid of faces (a row per prompt).

Option mapping, usage checks and messages only: the work is engine/pipeline.py's and engine/infer.py's.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings

import click

from t2f.cli import FiniteFloatRange, check_writable, nonempty_path, write_files
from t2f.stylegan2 import NOISE_MODES

from .config import PipelineConfig, pipeline_options
from .infer import IMAGE_FORMATS, ImageInputError, load_face_images, run_files, run_interactive
from .pipeline import MODES

MAX_N = 64                # Images per prompt.
MAX_IMAGES = 256          # Images per run.


def _image_format(ctx, param, value):
    """click callback: the --out extension names the format; anything else is refused rather than mislabelled."""
    nonempty_path(ctx, param, value)
    if os.path.splitext(value)[1].lower() not in IMAGE_FORMATS:
        raise click.BadParameter(f"{value!r} must end in {', '.join(IMAGE_FORMATS)} (the format written)", ctx=ctx, param=param)
    return value


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.argument("prompts",      nargs=-1, metavar="[PROMPT]...")
@click.option("--mode",         help="Condition: the text embedding, KNN bank combinations, or a face image", type=click.Choice(MODES), default="text", show_default=True)
@click.option("--image",        help="Face image for --mode image (repeat for more rows)", metavar="PATH", type=click.Path(dir_okay=False), multiple=True)
@click.option("--n",            help="Images per prompt (or image)", metavar="INT", type=click.IntRange(1, MAX_N), default=4, show_default=True)
@click.option("--seed",         help="Random seed", metavar="INT", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--truncation",   help="Truncation psi (1 = none)", metavar="FLOAT", type=FiniteFloatRange(-1, 2), default=0.7, show_default=True)
@click.option("--noise-mode",   help="Noise inputs", type=click.Choice(NOISE_MODES), default="const", show_default=True)
@click.option("--out",          help="Grid image, a row per prompt (.png, or .jpg / .jpeg for JPEG)", metavar="PNG", type=click.Path(dir_okay=False), callback=_image_format, default="faces.png", show_default=True)
@click.option("--save-images",  help="Also write one PNG per image here", metavar="DIR", type=click.Path(file_okay=False), callback=nonempty_path)
@click.option("--save-ws",      help="Also save the ws [images, num_ws, w_dim]", metavar="NPY", type=click.Path(dir_okay=False), callback=nonempty_path)
@pipeline_options()
@click.option("--bank",         help="Embedding bank for --mode knn [default: MAPPER/bank.safetensors]", metavar="PATH", type=click.Path(dir_okay=False))
@click.option("--knn-k",        help="KNN: nearest bank embeddings considered", metavar="INT", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--knn-m",        help="KNN: embeddings combined (farthest-point pick)", metavar="INT", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--knn-alpha",    help="KNN: Dirichlet concentration", metavar="FLOAT", type=FiniteFloatRange(0, 100, min_open=True), default=0.3, show_default=True)
@click.option("--interactive",  help="Read prompts from standard input, one per line; write OUT-NNNN.png for each", is_flag=True)
def main(prompts, mode, image, n, seed, truncation, noise_mode, out, save_images, save_ws, config: PipelineConfig, bank,
         knn_k, knn_m, knn_alpha, interactive):
    """Generate faces from text prompts (or more faces like a given face).

    The mapper is all it needs: the generator and CLIP are the ones it was trained for (its
    config.json records them), fetched once; --generator / --clip replace them (checked).

    \b
    Examples:
    # Offline smoke run on the CPU with random-weight tiny models (not a trained model):
    t2f-infer --mapper tiny "a smiling woman"

    \b
    # A mapper trained with t2f-train, 4 faces per prompt, a row per prompt:
    t2f-infer "a photo of an old man with white hair" "a smiling woman" \\
        --mapper runs/ffhq --n 4 --seed 0 --truncation 0.7 --out faces.png

    \b
    # A mapper someone published on the Hugging Face Hub (its generator and CLIP follow):
    t2f-infer "a smiling woman" --mapper hf-hub:ORG/NAME

    \b
    # KNN mode (the run's embedding bank), and more faces like a photo:
    t2f-infer "a woman with red hair" --mapper runs/ffhq --mode knn
    t2f-infer --mode image --image me.png --mapper runs/ffhq
    """
    request = _validate(prompts, mode, image, n, interactive, config.mapper, bank, out, save_images, save_ws)
    knn = dict(k=knn_k, m=knn_m, alpha=knn_alpha)
    load = dict(config=config, bank=(bank or "") if mode == "knn" else None, noise_mode=noise_mode)
    if interactive:
        return _run(request, load, lambda pipe: run_interactive(pipe, sys.stdin, out=out, write=write_files, mode=mode, n=n, seed=seed,
                                                                truncation=truncation, noise_mode=noise_mode, knn=knn, echo=click.echo))
    start = time.perf_counter()
    pipe, faces = _run(request, load, lambda pipe: pipe(request.labels, n=n, seed=seed, truncation_psi=truncation, noise_mode=noise_mode,
                                                          mode=mode, images=request.images, knn=knn))
    elapsed = time.perf_counter() - start
    info = dict(mode=mode, labels=request.labels, n=n, seed=seed, truncation=truncation, noise_mode=noise_mode,
                generator=pipe.sources.generator, clip=pipe.sources.clip, mapper=config.mapper, precision=str(pipe.precision),
                backend=pipe.backend.name, device=str(pipe.device))
    write_files(run_files(faces, request.labels, n, info, out, save_images, save_ws))
    h, w = faces.images.shape[1:3]
    click.echo(f"wrote {out}: {len(request.labels)} row(s) x {n} image(s) at {w}x{h} in {elapsed:.2f} s, "
               f"{pipe.summary}, mode {mode}")


@dataclasses.dataclass
class _Request:
    labels: list[str]                 # one per row: the prompts, or the --image paths
    images: object                    # mode image: [rows, 3, 256, 256] in [-1, 1]; else None


def _validate(prompts, mode, image, n, interactive, mapper, bank, out, save_images, save_ws) -> _Request:
    """Every usage check, before any model is loaded: click.BadParameter (exit 2) for the first problem."""
    from t2f.hub import is_hub_id

    from .prompts import is_blank

    prompts = [p.strip() for p in prompts]
    if interactive:
        if prompts or mode == "image":
            raise click.BadParameter("--interactive reads its prompts from standard input (modes text and knn)", param_hint="--interactive")
        prompts = ["warm-up"]
    if mode == "image":
        if not image:
            raise click.BadParameter("--mode image needs --image PATH", param_hint="--image")
        if prompts:
            raise click.BadParameter("--mode image takes no prompts", param_hint="PROMPT")
        labels = list(image)
    else:
        if image:
            raise click.BadParameter(f"--image goes with --mode image, not --mode {mode}", param_hint="--image")
        if not prompts:
            raise click.BadParameter("give at least one prompt", param_hint="PROMPT")
        if any(is_blank(p) for p in prompts):
            raise click.BadParameter("prompts must not be empty or whitespace", param_hint="PROMPT")
        labels = prompts
    if len(labels) * n > MAX_IMAGES:
        raise click.BadParameter(f"{len(labels)} rows x {n} images is more than {MAX_IMAGES} images per run", param_hint="--n")
    if mode == "knn" and bank is None and (mapper is None or not (is_hub_id(mapper) or os.path.isdir(mapper))):
        raise click.BadParameter("--mode knn needs --bank PATH or a --mapper run directory (or Hub mapper) holding bank.safetensors",
                                 param_hint="--bank")
    outputs = [(out, "--out", False), (save_images, "--save-images", True), (save_ws, "--save-ws", False)]
    for path, param, is_dir in outputs:
        if path is not None:
            check_writable(path, param, directory=is_dir)
    if save_ws is not None and os.path.abspath(save_ws) == os.path.abspath(out):
        raise click.BadParameter("--save-ws must not be the --out file", param_hint="--save-ws")
    try:
        images = load_face_images(labels) if mode == "image" else None
    except ImageInputError as e:
        raise click.BadParameter(str(e), param_hint="--image") from None
    return _Request(labels=labels, images=images)


def _run(request: _Request, load: dict, work):
    """Load the pipeline and call `work(pipe)`; user errors as one line, warnings as one line each."""
    from t2f.cli import user_errors
    from t2f.presets import is_random_preset

    from .config import build_pipeline
    from .pipeline import DeviceFallbackWarning

    with user_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pipe = build_pipeline(**load)
            for name in ("generator", "clip", "mapper"):
                value = getattr(pipe.sources, "label" if name == "mapper" else name)
                if is_random_preset(value):
                    click.echo(f"note: random weights (--{name} {value}): not a trained model, the images are not faces", err=True)
            return pipe, work(pipe)
        finally:
            for w in caught:
                if issubclass(w.category, DeviceFallbackWarning):
                    click.echo(f"note: {w.message}", err=True)
                elif "truncated" in str(w.message):
                    click.echo(f"warning: {w.message}", err=True)


if __name__ == "__main__":
    main()
