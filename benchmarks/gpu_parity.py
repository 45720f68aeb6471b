"""Parity of the GPU paths at full size: eager fp32 vs eager fp16 vs torch-cudagraph (random weights).

    python benchmarks/gpu_parity.py                                          # random-1024, ViT-B-32, CUDA
    python benchmarks/gpu_parity.py --generator tiny --clip tiny --device cpu   # the dry run: fp32 only

The same tokens, z and psi go through the three backends. Checked, each a row of the printed JSON:
- ws: every backend's mapper on the same (fp32) embedding gives bitwise identical ws (the mapper runs in
  fp32 everywhere), and torch-cudagraph's captured pipeline gives the ws of its own eager stages exactly;
- images from the same ws: eager fp16 and torch-cudagraph within FP16_BOUND relative error of eager fp32
  (float images) and within UINT8_MEAN levels on average (uint8), torch-cudagraph within one level of eager fp16;
- text embeddings: fp16 within FP16_BOUND of fp32.
On a CPU only the fp32 rows run (fp16 needs CUDA); the others are listed as skipped. Exit code 1 if a check fails.
"""

from __future__ import annotations

import json
import time

import click
import torch

from t2f.files import atomic_path

FP16_BOUND = 2e-2          # relative error of fp16 against fp32 (as t2f-export's parity bound)
UINT8_MEAN = 2.0           # mean absolute uint8 difference, fp16 against fp32


@click.command()
@click.option("--generator", default="random-1024", show_default=True)
@click.option("--clip",      default="ViT-B-32:random", show_default=True)
@click.option("--device",    default="cuda", show_default=True)
@click.option("--batch",     type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
def main(generator, clip, device, batch, json_path):
    import t2f
    from t2f.accuracy import accuracy
    from t2f.devices import resolve_device
    from t2f.engine.backends import BackendUnavailable, Models, make_backend
    from t2f.engine.pipeline import sample_z
    from t2f.precision import Precision
    from t2f.presets import random_mapper

    start = time.perf_counter()
    dev = resolve_device(device)
    G, C = t2f.load_generator(generator), t2f.load_clip(clip)
    M = random_mapper(G, C.embed_dim)
    prompts = ["a photo of an old man with white hair", "a smiling woman", "a child with curly hair", "a man with a beard"]
    tokens = C.tokenize([prompts[i % len(prompts)] for i in range(batch)]).to(dev, torch.int32)
    z, psi = sample_z(0, batch, 1, M.z_dim).to(dev), torch.full([batch], 0.7, device=dev)
    rows, skipped = [], []

    def check(name: str, ok: bool, **values) -> None:
        rows.append(dict(check=name, ok=bool(ok), **values))
        click.echo(f"{'ok  ' if ok else 'FAIL'} {name} {values}")

    backends = {}
    for name, precision in (("torch", Precision.FP32), ("torch", Precision.FP16), ("torch-cudagraph", Precision.FP16)):
        try:
            backends[(name, precision)] = make_backend(name, Models(G, C, M), dev, precision)
        except BackendUnavailable as e:
            skipped.append(dict(backend=name, precision=str(precision), reason=str(e)))
            click.echo(f"skip {name} {precision}: {e}")
    eager = backends[("torch", Precision.FP32)]
    if dev.type == "cuda":
        check("true fp32 and deterministic cuDNN pinned", not torch.backends.cudnn.allow_tf32 and
              not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark)
    with torch.no_grad():
        embedding = eager.encode(tokens)
        ws = eager.map(embedding, z, psi).clone()
        reference, reference_u8 = eager.synthesize_float(ws), eager.synthesize(ws).clone()
        check("fp32 eager deterministic", torch.equal(eager.synthesize(ws), reference_u8))
        for (name, precision), backend in backends.items():
            if (name, precision) == ("torch", Precision.FP32):
                continue
            label = f"{name} {precision}"
            check(f"{label}: ws identical on the same embedding", torch.equal(backend.map(embedding, z, psi), ws))
            err = accuracy({"embedding": backend.encode(tokens)}, {"embedding": embedding})["embedding_relative_error"]
            check(f"{label}: text embedding", err <= FP16_BOUND, relative_error=err)
            mean = accuracy({"image": backend.synthesize(ws)}, {"image": reference_u8})["uint8_mean_diff"]
            check(f"{label}: uint8 image from the same ws", mean <= UINT8_MEAN, mean_abs_levels=mean)
            if backend.separate_uint8:
                err = accuracy({"float_image": backend.synthesize_float(ws)}, {"float_image": reference})["float_image_relative_error"]
                check(f"{label}: float image from the same ws", err <= FP16_BOUND, relative_error=err)
        graph = backends.get(("torch-cudagraph", Precision.FP16))
        if graph is not None:
            graph_ws, graph_image = (t.clone() for t in graph.full(tokens, z, psi))
            check("torch-cudagraph: replayed ws equal its eager stages' ws",
                  torch.equal(graph_ws, graph.map(graph.encode(tokens), z, psi)))
            again = graph.full(tokens, z, psi)[1]
            check("torch-cudagraph: replays are deterministic", torch.equal(again, graph_image))
            half = backends[("torch", Precision.FP16)].synthesize(graph_ws)
            diff = accuracy({"image": graph_image}, {"image": half})["uint8_max_diff"]
            check("torch-cudagraph vs eager fp16 (same ws): uint8 within 1 level", diff <= 1, max_abs_levels=diff)
    result = dict(generator=generator, clip=C.name, device=str(dev), batch=batch, checks=rows, skipped=skipped,
                  device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  seconds=round(time.perf_counter() - start, 1), ok=all(r["ok"] for r in rows))
    text = json.dumps(result, indent=2)
    click.echo(text)
    if json_path:
        with atomic_path(json_path) as tmp:
            tmp.write_text(text + "\n")
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
