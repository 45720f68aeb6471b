"""t2f.trainer.train, the library path: the same run as t2f-train's, stages one at a time, errors as exceptions; FitLoss's terms."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import t2f.trainer as T
from helpers import invoke
from t2f.mapper import Mapper, MapperConfig
from t2f.trainer.cli import main as train_main
from t2f.trainer.fit import CVAEPass, FitLoss, energy_score, kl_divergence

# A small budget: 96 pairs, 12 fit steps on a small mapper, a CLIP-consistency step, a checkpoint and an evaluation.
SYNTH = T.SynthOptions(samples=96, shard_size=48, batch=48)
FIT = T.FitOptions(steps=12, batch=16, hidden=16, z_dim=4, warmup=0, kl_warmup=4, clip_every=6, clip_batch=2,
                   log_every=4, eval_every=12, checkpoint_every=6)
CONFIG = T.TrainConfig(generator="tiny", clip="tiny", progress=False, synth=SYNTH, fit=FIT, bank=T.BankOptions(size=50))


def without_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_s"} for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_train_makes_the_run_that_t2f_train_makes(tmp_path, capsys):
    assert T.train(tmp_path / "library", CONFIG) is True
    assert "done in" in capsys.readouterr().out
    args = ["--generator", "tiny", "--clip", "tiny", "--no-progress", "--out", tmp_path / "cli",
            "--samples", 96, "--shard-size", 48, "--synth-batch", 48, "--bank-size", 50,
            "--steps", 12, "--batch", 16, "--hidden", 16, "--z-dim", 4, "--warmup", 0, "--kl-warmup", 4, "--clip-every", 6,
            "--clip-batch", 2, "--log-every", 4, "--eval-every", 12, "--checkpoint-every", 6]
    invoke(train_main, args, expect=0)
    library, cli = tmp_path / "library", tmp_path / "cli"
    a, b = load_file(str(library / "model.safetensors")), load_file(str(cli / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(library / "stats.jsonl") == without_timing(cli / "stats.jsonl")
    assert [e["step"] for e in without_timing(library / "stats.jsonl")] == [4, 8, 12]
    assert json.loads((library / "options.json").read_text()) == json.loads((cli / "options.json").read_text())
    assert load_file(str(library / "bank.safetensors"))["embeddings"].shape[0] == 50


def test_stages_one_at_a_time_resume_and_refuse_another_run(tmp_path):
    run = tmp_path / "run"
    assert T.train(run, CONFIG, stages=["synth"]) is True
    assert (run / "pairs" / "manifest.json").exists() and not (run / "checkpoint.pt").exists()
    # fit alone takes the generator and CLIP the run recorded; stop_after leaves it incomplete, the next call finishes.
    fit_only = T.TrainConfig(progress=False, fit=FIT, stop_after=6)
    assert T.train(run, fit_only, stages="fit") is False
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6 and not (run / "model.safetensors").exists()
    assert T.train(run, fit_only, stages=["fit"]) is True and (run / "model.safetensors").exists()
    assert T.train(run, CONFIG, stages=["bank"]) is True and (run / "bank.safetensors").exists()
    # Other weight-changing options on a run that has them: an exception, nothing written.
    before = (run / "options.json").read_text()
    with pytest.raises(T.RunError, match="fit lr was 0.01, now 0.02"):
        T.train(run, T.TrainConfig(progress=False, fit=dataclasses.replace(FIT, lr=0.02)), stages=["fit"])
    assert (run / "options.json").read_text() == before
    with pytest.raises(ValueError, match="stages must be"):
        T.train(run, CONFIG, stages=["fit", "report"])
    with pytest.raises(T.RunError, match="needs a generator"):
        T.train(tmp_path / "new", T.TrainConfig(), stages=["synth"])
    assert not os.path.exists(tmp_path / "new" / "options.json")


def test_fit_loss_returns_its_terms_and_their_weighted_sum(tiny_generator, tiny_clip):
    generator = tiny_generator
    mapper = Mapper(MapperConfig(embed_dim=tiny_clip.embed_dim, w_dim=generator.w_dim, num_ws=generator.num_ws, z_dim=4,
                                 hidden=16, layers=2, mean_head=True))
    model = CVAEPass(mapper)
    g = torch.Generator().manual_seed(0)
    w, e = torch.randn([6, generator.w_dim], generator=g), torch.randn([6, tiny_clip.embed_dim], generator=g)
    eps, z_prior = torch.randn([6, 4], generator=g), torch.randn([6, 2, 4], generator=g)
    loss_fn = FitLoss(generator, None, kl=0.5, kl_warmup=10, prior_weight=2.0, mean_weight=3.0, clip_weight=1.0,
                      clip_every=1, clip_batch=2, clip_prior=True)
    terms = loss_fn(model, w, e, e, eps, z_prior, step=5)
    assert set(terms) == {"loss", "reconstruction", "kl", "prior", "regression"}   # no CLIP: no clip_loss
    ws_hat, mu, logvar, ws_prior, ws_mean = model(w, e, eps, z_prior)
    target = w.unsqueeze(1)
    assert torch.equal(terms["kl"], kl_divergence(mu, logvar)) and torch.equal(terms["reconstruction"], (ws_hat - target).square().mean())
    assert torch.equal(terms["prior"], energy_score(ws_prior, target.expand(-1, ws_hat.shape[1], -1)))
    assert loss_fn.kl_weight(5) == 0.25 and loss_fn.kl_weight(20) == 0.5
    expected = terms["reconstruction"] + 0.25 * terms["kl"] + 2.0 * terms["prior"] + 3.0 * terms["regression"]
    assert torch.allclose(terms["loss"], expected, rtol=1e-6) and terms["loss"] > 0
    terms["loss"].backward()
    assert all(p.grad is not None for p in mapper.parameters())    # every weight is trained by some term
    # With CLIP, the CLIP-consistency term comes every clip_every steps, weighted into the sum.
    with_clip = FitLoss(generator, tiny_clip, kl=0.5, kl_warmup=0, prior_weight=1.0, mean_weight=1.0, clip_weight=4.0,
                        clip_every=3, clip_batch=2, clip_prior=True)
    assert "clip_loss" not in with_clip(model, w, e, e, eps, z_prior, step=4)
    terms = with_clip(model, w, e, e, eps, z_prior, step=6)
    assert 0 < terms["clip_loss"] < 2
    rest = terms["reconstruction"] + 0.5 * terms["kl"] + terms["prior"] + terms["regression"]
    assert torch.allclose(terms["loss"], rest + 4.0 * terms["clip_loss"], rtol=1e-6)


def test_the_run_holds_its_model_card(tmp_path):
    """README.md: the Hub's YAML metadata (as huggingface_hub's own ModelCard reads it) then markdown, rewritten when a
    stage finishes, from the run's files, touching none of them; a README.md of the user's own is kept."""
    import yaml
    from huggingface_hub import ModelCard

    from t2f.engine import load_pipeline
    from t2f.trainer.card import MARKER, write_card
    from t2f.trainer.run import Run

    run = tmp_path / "run"
    assert T.train(run, CONFIG, stages=["synth"]) is True
    assert "None yet: fit has not reached its first evaluation" in (run / "README.md").read_text()
    assert T.train(run, CONFIG, stages=["fit"]) is True and T.train(run, CONFIG, stages=["bank"]) is True
    text = (run / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    card = ModelCard(text)
    assert card.data.library_name == meta["library_name"] == "t2f" and "t2f" in card.data.tags and card.data.license == "other"
    config = json.loads((run / "config.json").read_text())
    for kind in ("generator", "clip"):
        entry = meta["t2f"][kind]
        assert (entry["name"], entry["fingerprint"]) == (config[kind]["name"], config[kind]["fingerprint"])
        assert entry["source"].startswith("t2f preset tiny") and entry["licence"].startswith("MIT")
    last = [e for e in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if "w_explained" in e][-1]
    assert meta["t2f"]["metrics"] == {k: last[k] for k in meta["t2f"]["metrics"]} and meta["t2f"]["metrics"]["step"] == 12
    assert {"w_explained", "z_spread", "w_error"} <= set(meta["t2f"]["metrics"])
    options = json.loads((run / "options.json").read_text())
    assert meta["t2f"]["options"] == {stage: options[stage]["identity"] for stage in ("synth", "fit", "bank")}
    assert body.startswith(MARKER + "\n\n# t2f mapper for tiny and CLIP tiny\n")
    assert 't2f-infer --mapper hf-hub:ORG/NAME "a smiling woman"' in body and f't2f-infer --mapper {run} "a smiling woman"' in body
    assert f"| `w_explained` | {last['w_explained']:.4g} |" in body and "## Held-out metrics (step 12 of 12)" in body
    # Rewriting the model card changes no other file of the run.
    others = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "README.md"}
    assert write_card(Run(run)) == run / "README.md" and (run / "README.md").read_text() == text
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "README.md"} == others
    # A README.md without the marker is the user's own.
    (run / "README.md").write_text("my own card\n")
    assert T.train(run, CONFIG, stages=["bank"]) is True and (run / "README.md").read_text() == "my own card\n"
    # And the run is a pipeline by itself.
    assert load_pipeline(run, device="cpu", backend="torch", progress=False).sources.generator == "tiny"
