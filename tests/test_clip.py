"""CLIP wrapper on a tiny registered open_clip config with random weights."""

import warnings

import pytest
import torch

from t2f.clip import ClipLoadError, ClipSpec, PromptTruncatedWarning, load_clip

from helpers import tiny_clip_variant


def test_text_embeddings_are_normalized_and_deterministic(tiny_clip):
    prompts = ["a smiling woman", "an old man with white hair"]
    a = tiny_clip.encode_text(prompts)
    b = load_clip("tiny").encode_text(prompts)
    assert a.shape == (2, tiny_clip.embed_dim) == (2, 128)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])


def test_long_prompt_is_truncated_with_a_warning(tiny_clip):
    long = " ".join(["face"] * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = tiny_clip.tokenize([long, "short"])
    assert tokens.shape == (2, tiny_clip.context_length)
    assert [type(w.message) for w in caught] == [PromptTruncatedWarning]
    assert "truncated" in str(caught[0].message)


@pytest.mark.parametrize("size", [(16, 16), (64, 64), (48, 80)])
def test_image_embeddings_any_size_and_differentiable(tiny_clip, size):
    images = (torch.rand(2, 3, *size) * 2 - 1).requires_grad_(True)
    emb = tiny_clip.encode_image(images)
    assert emb.shape == (2, tiny_clip.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    emb[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_image_preprocessing_matches_clip_normalization(tiny_clip):
    """An image already at CLIP's size is only mapped to [0, 1] and normalized with CLIP's mean/std."""
    enc = tiny_clip.image_encoder
    images = torch.rand(1, 3, enc.size, enc.size) * 2 - 1
    expected = torch.nn.functional.normalize(tiny_clip.model.encode_image(((images + 1) / 2 - enc.mean) / enc.std), dim=-1)
    assert torch.allclose(tiny_clip.encode_image(images), expected, atol=1e-6)


def test_spec_parsing():
    assert ClipSpec.parse("ViT-B-32:openai") == ClipSpec("ViT-B-32", "openai")
    assert ClipSpec.parse("ViT-B-16") == ClipSpec("ViT-B-16", "openai")
    assert ClipSpec.parse("tiny").name == "tiny"
    with pytest.raises(ValueError):
        ClipSpec.parse(":openai")


def test_unknown_model_and_tag():
    with pytest.raises(ClipLoadError, match="unknown open_clip model"):
        load_clip("ViT-Nope-1:openai")
    with pytest.raises(ClipLoadError, match="neither a pretrained tag"):
        load_clip("ViT-B-32:no-such-tag")


def test_offline_pretrained_names_url_and_flag():
    with pytest.raises(ClipLoadError) as info:
        load_clip("ViT-B-32:openai")
    message = str(info.value)
    assert "vit_base_patch32_clip_224.openai" in message and "--clip ViT-B-32:/path/to/checkpoint" in message
    assert "\n" not in message


def test_a_tower_with_an_embedding_per_token_is_refused_when_loaded():
    with pytest.raises(ClipLoadError, match="one text embedding per token \\(text pooling 'none'\\)"):
        tiny_clip_variant("none")


def test_random_weights_are_the_same_on_every_load():
    """open_clip leaves CoCa's text_decoder.text_projection uninitialized: t2f's random weights set it to zero, so later
    loads (after memory that held other values was freed, which the allocator hands out again) have the same weights
    and fingerprint. Without that, most loads here got stale values (whether one does depends on the allocator)."""
    first = tiny_clip_variant("coca")
    shape = first.model.text_decoder.text_projection.shape
    for _ in range(3):
        for blocks in (1, 16, 16):
            junk = [torch.full(shape, 7.0) for _ in range(blocks)]
            del junk
        again = tiny_clip_variant("coca")
        assert torch.equal(again.model.text_decoder.text_projection, torch.zeros(shape))
        assert again.fingerprint == first.fingerprint


def test_a_tokenizer_that_cannot_be_had_is_one_line():
    """SigLIP's tokenizer comes from Hugging Face: without transformers, or offline without its files, one line."""
    with pytest.raises(ClipLoadError, match="^(the tokenizer of ViT-B-16-SigLIP needs the Python package|cannot load the "
                                            "tokenizer of ViT-B-16-SigLIP)") as info:
        load_clip("ViT-B-16-SigLIP:random")
    assert "\n" not in str(info.value)


def test_a_missing_tower_is_a_usage_error(tiny_clip):
    """A CLIP holding one tower (a pipeline's own `clip` where its backend runs copies or graphs) refuses the other in one line."""
    from t2f.errors import UsageError

    with pytest.raises(UsageError, match="holds its image tower only .* not its text tower"):
        tiny_clip.only("image").encode_text(["a smiling woman"])
    with pytest.raises(UsageError, match="holds its text tower only .* not its image tower"):
        tiny_clip.only("text").encode_image(torch.zeros([1, 3, 32, 32]))
