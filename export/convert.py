"""`t2f-convert`: any supported StyleGAN2 weights -> a t2f generator directory (the conversion is t2f.weights')."""

from __future__ import annotations

import os
import time

import click

from t2f.cli import nonempty_path


def _is_generator_dir(path: str) -> bool:
    from t2f.io import WeightsError, read_config
    from t2f.weights import GENERATOR_KIND

    try:                                        # a bounded read: a FIFO or a device named config.json is refused, not waited on
        read_config(path, GENERATOR_KIND, f"{path} holds no config.json")
        return True
    except WeightsError:
        return False


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.argument("source",       metavar="SOURCE")
@click.option("--out",          help="Output directory (config.json + model.safetensors)", metavar="DIR", type=click.Path(file_okay=False), required=True, callback=nonempty_path)
@click.option("--overwrite",    help="Replace an existing output directory", is_flag=True)
@click.option("--cache",        help="Download cache for presets [default: $T2F_CACHE or ~/.cache/t2f]", metavar="DIR", type=click.Path(file_okay=False))
def main(source, out, overwrite, cache):
    """Convert StyleGAN2 weights into a t2f generator directory, without running any code from them.

    SOURCE is an NVIDIA stylegan2-ada-pytorch / stylegan3-release StyleGAN2 pickle, a
    rosinality stylegan2-pytorch .pt checkpoint (g_ema + latent_avg), a t2f directory, or a
    preset name (ffhq-1024 downloads NVIDIA's FFHQ pickle once into the cache).

    \b
    Examples:
    t2f-convert ffhq.pkl --out weights/ffhq-1024
    t2f-convert stylegan2-ffhq-config-f.pt --out weights/ffhq-rosinality
    """
    from t2f import load_generator
    from t2f.cli import user_errors
    from t2f.files import OutputPathError, check_output_dir
    from t2f.weights import save_generator

    try:
        check_output_dir(out, replace=True)
    except OutputPathError as e:
        raise click.BadParameter(str(e), param_hint="--out") from None
    if os.path.exists(out):
        if not overwrite:
            raise click.BadParameter(f"{out} already exists; pass --overwrite to replace it", param_hint="--out")
        if not _is_generator_dir(out):
            raise click.BadParameter(f"refusing to replace {out}: it is not a t2f generator directory", param_hint="--out")
    start = time.perf_counter()
    with user_errors():
        generator = load_generator(source, cache=cache)
    with user_errors(output=out):
        save_generator(generator, out, overwrite=overwrite, source=os.path.basename(str(source)))
    cfg = generator.config
    click.echo(f"wrote {out}: StyleGAN2 {cfg.resolution}x{cfg.resolution}, {generator.num_ws} ws x {cfg.w_dim}, "
               f"{sum(p.numel() for p in generator.parameters()) / 1e6:.1f} M parameters, in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
