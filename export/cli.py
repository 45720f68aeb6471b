"""`t2f-export`: ONNX graphs and TensorRT engines of the text encoder, mapper and synthesis network.

Option mapping, usage checks and messages only: the work is export/build.py's (`export_models`).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from t2f.cli import PrecisionChoice, check_writable, model_options, nonempty_path, user_errors
from t2f.graphs import DEFAULT_PROFILE
from t2f.precision import Precision


def _batch_range(ctx, param, value: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected MIN:OPT:MAX, got {value!r}") from None
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2] <= 4096:
        raise click.BadParameter(f"expected 1 <= MIN <= OPT <= MAX <= 4096, got {value!r}")
    return parts


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@model_options()
@click.option("--out",          help="Output directory", metavar="DIR", type=click.Path(file_okay=False), required=True, callback=nonempty_path)
@click.option("--fp16",         help="fp16 graphs (fp32 LayerNorm, softmax, demodulation) and engines: --precision fp16", is_flag=True)
@click.option("--precision",    help="fp32; fp16 (graphs and engines for CUDA); bf16 (the fp32 graphs with each graph's bf16 parity in OpenVINO, for CPUs; ONNX only)", type=PrecisionChoice(auto=False))
@click.option("--batch",        help="TensorRT profile (parity at MIN and at MAX up to 3)", metavar="MIN:OPT:MAX", default=":".join(map(str, DEFAULT_PROFILE)), show_default=True, callback=_batch_range)
@click.option("--onnx-only",    help="Stop after the ONNX graphs (no TensorRT)", is_flag=True)
@click.option("--opt-level",    help="TensorRT builder optimization level", metavar="INT", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--timing-cache", help="TensorRT timing cache [default: OUT/timing.cache]", metavar="PATH", type=click.Path(dir_okay=False))
def main(models, out, fp16, precision, batch, onnx_only, opt_level, timing_cache):
    """Export the text encoder, mapper and synthesis network to ONNX, then TensorRT engines.

    Re-running with the same models and options rebuilds nothing. A parity table (each graph
    in ONNX Runtime against eager PyTorch fp32) is printed and saved as OUT/parity.md.

    \b
    Examples:
    t2f-export --mapper runs/ffhq --out engines/ffhq --fp16 --batch 1:8:32
    t2f-export --mapper runs/ffhq --out engines/ffhq --precision bf16          # for OpenVINO on the CPU
    t2f-export --mapper hf-hub:ORG/NAME --out engines/hub --onnx-only         # a mapper from the Hugging Face Hub
    t2f-export --mapper tiny --out /tmp/tiny --onnx-only
    """
    from t2f.artifacts import foreign_files
    from t2f.graphs import ExportError

    from .build import export_models
    from .onnx_export import check_parity_precision

    check_writable(out, "--out", directory=True)
    out = Path(out)
    foreign = foreign_files(out)
    if foreign:
        raise click.BadParameter(f"{out} holds files that are not a t2f-export output ({', '.join(foreign[:3])}); "
                                 "choose another --out", param_hint="--out")
    if fp16 and precision not in (None, Precision.FP16):
        raise click.BadParameter(f"--fp16 contradicts --precision {precision}", param_hint="--fp16")
    precision = precision or Precision.from_flag(fp16)
    if precision is Precision.BF16 and not onnx_only:
        click.echo("note: bf16 runs on the CPU through OpenVINO; writing the ONNX graphs only (no TensorRT engines)", err=True)
        onnx_only = True
    try:                            # export_models refuses it: OpenVINO would run fp32 here and a bf16 check call it bf16
        check_parity_precision(precision)
        no_bf16 = False
    except ExportError:
        no_bf16 = True
        click.echo("note: bf16 is not available on this CPU (no AVX512_BF16 or AMX instructions), so its parity cannot be "
                   "measured here; exporting and checking the fp32 graphs only", err=True)
        precision = Precision.FP32
    start = time.perf_counter()
    with user_errors(output="the output"):
        manifest, specs = export_models(out, models, precision, batch, onnx_only, opt_level,
                                        Path(timing_cache) if timing_cache else None, log=click.echo)
    if onnx_only:
        runs = ""
        if precision is Precision.BF16:
            runs = "; " + ", ".join(f"{g} runs {p}" for g, p in manifest.graph_precisions["bf16"].items())
        if no_bf16:
            runs = ("; not bf16: this CPU has no bf16 instructions, so fp32 ran and no graph is checked for bf16; export bf16 on "
                    "a CPU with AVX512_BF16 or AMX")
        click.echo(f"wrote {out}: ONNX {precision} ({len(specs)} graphs, parity ok{runs}) in {time.perf_counter() - start:.1f} s")
        return
    click.echo(f"wrote {out}: ONNX and TensorRT {precision} engines in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
