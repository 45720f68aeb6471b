"""Trainer throughput: synth samples/s and fit steps/s, on any generator, CLIP and device.

    python benchmarks/train_throughput.py                                   # tiny models, CPU
    python benchmarks/train_throughput.py --generator random-1024 --clip ViT-B-32:random --device cuda \
        --samples 512 --synth-batch 32 --steps 200 --batch 256 --json out.json

Runs the real `t2f-train` stages in a temporary run directory: synth of --samples pairs, then
fit for --steps steps (with the CLIP-consistency loss every --clip-every steps). Reports the
rate of the work itself, model loading excluded; the first batch/steps are warm-up and excluded.
Prints one JSON object (and writes it with --json). On CUDA the run keeps PyTorch's numerics, as `t2f-train`
does: "precision" says what fp32 computed ("fp32 (TF32 in cuDNN convolutions)" under PyTorch's defaults) and
"cuda_numerics" holds the flags.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time

import click
import torch

from t2f.files import atomic_path


@click.command()
@click.option("--generator",   default="tiny", show_default=True)
@click.option("--clip",        default="tiny", show_default=True)
@click.option("--device",      default="auto", show_default=True)
@click.option("--samples",     type=click.IntRange(min=2), default=4000, show_default=True)
@click.option("--synth-batch", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--downsample",  type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--steps",       type=click.IntRange(min=20), default=1000, show_default=True)
@click.option("--batch",       type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--clip-every",  type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
def main(generator, clip, device, samples, synth_batch, downsample, steps, batch, clip_every, json_path):
    import t2f
    from t2f.devices import cuda_numerics, fp32_label, resolve_device
    from t2f.io import fingerprint
    from t2f.trainer.fit import FitOptions, fit
    from t2f.trainer.run import Dist, Run
    from t2f.trainer.synth import load_pairs, synth

    dev = resolve_device(device)
    G = t2f.load_generator(generator)
    C = t2f.load_clip(clip)
    one = Dist(0, 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(tmp)
        identity = dict(samples=samples, shard_size=samples, seed=0, downsample=downsample, clip=C.name,
                        clip_fingerprint=C.fingerprint, generator=generator, generator_fingerprint=fingerprint(G))
        # Warm-up: one batch of synth (kernels, allocator), not timed.
        warm = Run(f"{tmp}/warm")
        synth(warm, G, C, dict(identity, samples=synth_batch, shard_size=synth_batch), one, dev, batch_size=synth_batch, progress=False)
        sync(dev)
        t0 = time.perf_counter()
        synth(run, G, C, identity, one, dev, batch_size=synth_batch, progress=False)
        sync(dev)
        synth_s = time.perf_counter() - t0
        W, E, _ = load_pairs(run)
        options = FitOptions(steps=steps, batch=batch, clip_every=clip_every, clip_batch=8, log_every=steps // 2,
                             eval_every=10**9, checkpoint_every=10**9, val_fraction=0.05)
        fit(run, W, E, G, C, options, identity, one, dev, progress=False)
        stats = [json.loads(line) for line in (run.stats_path).read_text().splitlines()]
    # steps_per_s of the second half: from the mid log line to the end.
    mid, end = stats[0], stats[-1]
    t_mid, t_end = mid["step"] / mid["steps_per_s"], end["step"] / end["steps_per_s"]
    result = dict(
        date=time.strftime("%Y-%m-%d"), device=str(dev), device_name=device_name(dev), torch=torch.__version__,
        threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
        generator=generator, clip=C.name, resolution=G.resolution, precision=fp32_label(dev),
        cuda_numerics=cuda_numerics() if dev.type == "cuda" else None,
        synth_samples=samples, synth_batch=synth_batch, synth_samples_per_s=round(samples / synth_s, 2),
        fit_steps=steps, fit_batch=batch, clip_every=clip_every,
        fit_steps_per_s=round((end["step"] - mid["step"]) / (t_end - t_mid), 2),
    )
    text = json.dumps(result, indent=2)
    click.echo(text)
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(text + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
