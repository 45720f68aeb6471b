"""The run's model card: RUN/README.md, with the Hugging Face Hub's metadata, ready to publish the run as it is.

t2f-train rewrites it (atomically) whenever a stage finishes, from what the run holds: options.json
(the options that define the result), config.json (the generator and CLIP the mapper was trained for)
and stats.jsonl (the last held-out evaluation). Nothing else in the run is touched. A README.md
without the model card's marker line is the user's own and is left alone. docs/publishing.md says how to
upload a run and which of its files to include.
"""

from __future__ import annotations

import json
from pathlib import Path

from t2f.files import atomic_path

from .run import Run

CARD_NAME = "README.md"
MARKER = "<!-- t2f-train card: rewritten when a stage finishes; delete this line to keep your own edits -->"
TAGS = ("t2f", "text-to-face", "text-to-image", "stylegan2", "clip", "conditional-vae", "faces")
PROMPT = "a smiling woman"
HUB_ID = "hf-hub:ORG/NAME"         # the id it will have: the publisher's repository
# Held-out metrics (trainer/fit.py's evaluate), with what each says.
METRICS = {
    "w_explained": "share of w's variance the embedding explains (1 - w_error / w_error_mean_baseline); higher follows the text more",
    "z_spread": "variance of w over z for one embedding, relative to the data's: how much one prompt's faces differ",
    "w_error": "held-out w error of the embedding alone (mean over z)",
    "w_error_mean_baseline": "the same error when predicting the training mean w",
    "w_error_posterior": "w error through the encoder's mean (the reconstruction path)",
    "clip_consistency": "cos(CLIP(G(w_hat)), e): does a decoded face re-embed near its condition",
    "clip_consistency_ceiling": "cos(CLIP(G(w)), e) of the true w: that value's ceiling",
}
FILES = {
    "config.json": "the mapper's architecture and the generator and CLIP it was trained for (what --mapper reads first)",
    "model.safetensors": "the mapper's weights (EMA)",
    "bank.safetensors": "CLIP image embeddings for --mode knn",
    CARD_NAME: "this card",
}


def card_path(run: Run) -> Path:
    return run.out / CARD_NAME


def write_card(run: Run) -> Path | None:
    """Write RUN/README.md from the run's files; None (nothing written) where a README.md of the user's own is there."""
    path = card_path(run)
    if path.is_file() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    text = card_text(run)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def card_text(run: Run) -> str:
    """The model card: YAML front matter (the Hub's model metadata, and t2f's) then markdown."""
    import yaml

    from t2f.presets import clip_origin, generator_origin

    from .report import read_stats

    options = run.options()
    synth = options.get("synth") or {}
    models = _trained_for(run, synth)
    origins = dict(generator=generator_origin(models["generator"]["name"]), clip=clip_origin(models["clip"]["name"]))
    for key, origin in origins.items():
        models[key].update(source=origin.source, licence=origin.licence)
    evals = [e for e in read_stats(run) if "w_explained" in e]
    metrics = {k: evals[-1][k] for k in ("step", *METRICS, "warning") if k in evals[-1]} if evals else {}
    identity = {stage: (options.get(stage) or {}).get("identity") for stage in ("synth", "fit", "bank") if stage in options}
    meta = dict(library_name="t2f", license="other", pipeline_tag="text-to-image", tags=list(TAGS),
                t2f=dict(kind="t2f-mapper", generator=models["generator"], clip=models["clip"], metrics=metrics, options=identity))
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n{MARKER}\n\n" + "\n".join(_body(run, models, metrics, identity, options)) + "\n"


def _trained_for(run: Run, synth: dict) -> dict:
    """{"generator": {name, fingerprint}, "clip": {...}}: the mapper's config.json where fit wrote it (read as
    t2f.sources reads a mapper's record), else synth's record."""
    from t2f.io import WeightsError, read_config
    from t2f.mapper import MAPPER_KIND, trained_for

    try:
        record = trained_for(read_config(run.out, MAPPER_KIND, f"{run.out} holds no mapper yet"), str(run.out))
    except WeightsError:
        identity = synth.get("identity") or {}
        return dict(generator=dict(name=synth.get("generator"), fingerprint=identity.get("generator_fingerprint")),
                    clip=dict(name=identity.get("clip"), fingerprint=identity.get("clip_fingerprint")))
    return dict(generator=dict(name=record.generator, fingerprint=record.generator_fingerprint),
                clip=dict(name=record.clip, fingerprint=record.clip_fingerprint))


def _body(run: Run, models: dict, metrics: dict, identity: dict, options: dict) -> list[str]:
    g, c = models["generator"], models["clip"]
    steps = ((options.get("fit") or {}).get("identity") or {}).get("steps")
    hub, local = f't2f-infer --mapper {HUB_ID} "{PROMPT}"', f't2f-infer --mapper {run.out} "{PROMPT}"'
    width = max(len(hub), len(local)) + 2
    lines = [
        f"# t2f mapper for {g['name']} and CLIP {c['name']}",
        "",
        "A text-to-face mapper for t2f: CLIP text encoder -> this mapper (Fast text2StyleGAN's conditional VAE, trained "
        "without captions on the generator's own samples) -> StyleGAN2. The mapper is all that is published here; t2f "
        "fetches the generator and CLIP below, the first time, by the names recorded in config.json, and checks their "
        "weights by fingerprint.",
        "",
        "## Use",
        "",
        "```bash",
        "# first install t2f as its README says (from its source: it is not on PyPI)",
        hub.ljust(width) + "# this repository (ORG/NAME: where it is published)",
        local.ljust(width) + "# the run directory it was trained in",
        "```",
        "",
        "```python",
        "from t2f.engine import load_pipeline",
        "",
        f'pipe = load_pipeline("{HUB_ID}")',
        f'faces = pipe("{PROMPT}", n=4)               # faces.images: [4, H, W, 3] uint8',
        "```",
        "",
        "## Trained for",
        "",
        "| model | name | fingerprint | source | licence |",
        "|---|---|---|---|---|",
        *[f"| {kind} | `{m['name']}` | `{m['fingerprint']}` | {m['source']} | {m['licence']} |" for kind, m in models.items()],
        "",
        "The mapper's own licence is the publisher's choice (`license: other` above until one is set); the generator "
        "and CLIP keep theirs, whatever this card says.",
        "",
    ]
    if metrics:
        lines += [f"## Held-out metrics (step {metrics['step']} of {steps})", "", "| metric | value | what it says |", "|---|---|---|"]
        lines += [f"| `{k}` | {metrics[k]:.4g} | {METRICS[k]} |" for k in METRICS if k in metrics]
        if "warning" in metrics:
            lines += ["", f"**{metrics['warning']}**"]
    else:
        lines += ["## Held-out metrics", "", "None yet: fit has not reached its first evaluation."]
    lines += ["", "## Training options", "", "The options that define the result (options.json's identity of each stage):", ""]
    for stage, values in identity.items():
        lines.append(f"- **{stage}**: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in values.items()))
    lines += ["", "## Files", "", "| file | what |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in FILES.items() if name == CARD_NAME or (run.out / name).is_file()]
    return lines
