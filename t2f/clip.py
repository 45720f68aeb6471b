"""CLIP through open_clip: text and image embeddings in one L2-normalized space.

`load_clip("ViT-B-32:openai")` takes any open_clip model name and pretrained tag (or a
local checkpoint file in place of the tag); `load_clip("tiny")` builds a tiny registered
config with random weights from a fixed seed, for tests and offline smoke runs, and
`load_clip("ViT-B-32:random")` any architecture with random weights, for timing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import T2FError, UsageError, first_line
from .presets import DEFAULT_CLIP, TINY, TINY_SEED

TINY_MODEL_NAME = "t2f-tiny"
RANDOM_TAG = "random"               # "MODEL:random": the architecture with random weights from TINY_SEED (timing only).
_CONFIG_DIR = Path(__file__).parent / "clip_configs"


class ClipLoadError(T2FError):
    """A CLIP model that cannot be created or whose weights cannot be had."""


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than CLIP's context was cut."""


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    model: str                     # open_clip model name, e.g. "ViT-B-32".
    pretrained: str | None         # Pretrained tag ("openai") or a local checkpoint file; None = random.

    @classmethod
    def parse(cls, spec: str) -> "ClipSpec":
        spec = spec.strip()
        if spec == TINY:
            return cls(TINY_MODEL_NAME, None)
        model, sep, pretrained = spec.partition(":")
        if not model:
            raise UsageError(f"invalid CLIP spec {spec!r}; expected MODEL:TAG, e.g. {DEFAULT_CLIP}")
        if pretrained == RANDOM_TAG:
            return cls(model, None)
        return cls(model, pretrained if sep else "openai")

    @property
    def name(self) -> str:
        """A stable identity, recorded by mappers trained for this CLIP."""
        if self.model == TINY_MODEL_NAME and self.pretrained is None:
            return TINY
        if self.pretrained is None:
            return f"{self.model}:{RANDOM_TAG}"
        if self.pretrained and Path(self.pretrained).is_file():
            return f"{self.model}:{Path(self.pretrained).name}"
        return f"{self.model}:{self.pretrained}"


# ----------------------------------------------------------------------------
# Thin modules, one job each (these are what export traces).


class TextEncoder(nn.Module):
    """tokens [batch, context] int -> L2-normalized text embedding [batch, embed_dim]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


class ImageEncoder(nn.Module):
    """Images [batch, 3, H, W] in [-1, 1], any size -> L2-normalized image embedding; differentiable.

    Applies CLIP's preprocessing in torch: resize the shorter side to CLIP's input size
    (bicubic, antialiased), center crop, then normalize with CLIP's mean and std.
    """

    def __init__(self, model: nn.Module, size: int, mean, std):
        super().__init__()
        self.model = model
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.to(torch.float32) + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        if (h, w) != (self.size, self.size):
            new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
            x = x[:, :, top : top + self.size, left : left + self.size]
        x = (x - self.mean) / self.std
        return F.normalize(self.model.encode_image(x), dim=-1)


# ----------------------------------------------------------------------------
# The wrapper.


class Clip:
    """An open_clip model with its tokenizer: prompts or images -> normalized embeddings."""

    def __init__(self, model: nn.Module, tokenizer, spec: ClipSpec):
        import open_clip

        self.spec = spec
        self.name = spec.name
        self._fingerprint = None
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.context_length = int(getattr(tokenizer, "context_length", 77))
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.text_encoder = TextEncoder(self.model)
        self.image_encoder = ImageEncoder(self.model, int(size), cfg.get("mean"), cfg.get("std"))
        probe = self.text_encoder(self.tokenize(["a"]))
        if probe.ndim != 2:
            raise ClipLoadError(f"CLIP {self.name} gives one text embedding per token (text pooling 'none'), "
                                "not one per prompt; t2f needs a pooled text tower")
        self.embed_dim = int(probe.shape[-1])

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the architecture (module tree, activations included) and the weights.

        Every tensor contributes its name, shape and a strided sample of about 4096 values:
        different checkpoints differ everywhere, and hashing 600 MB on every load would not pay.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(self.model).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous()
                digest.update(f"{name}{tuple(tensor.shape)}".encode())
                digest.update(sample.numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "Clip":
        """Moves this Clip's weights to `device` in place (as nn.Module.to does) and returns it; see `on` for a copy."""
        self.model.to(device)
        if self.image_encoder is not None:
            self.image_encoder.to(device)
        return self

    @property
    def vocab_size(self) -> int:
        """How many token ids the tokenizer has (open_clip's SimpleTokenizer: vocab_size; a Hugging Face one: its length)."""
        size = getattr(self.tokenizer, "vocab_size", None)
        return int(size) if size is not None else len(self.tokenizer.tokenizer)

    def on(self, device) -> "Clip":
        """This Clip where its weights are on `device` already, else a copy on `device`: this one is not moved."""
        from .devices import placed

        holder = self.image_encoder if self.image_encoder is not None else self.text_encoder   # the image encoder holds
        moved = placed(holder, device)                              # the model and CLIP's preprocessing buffers
        if moved is holder:
            return self
        clip = copy.copy(self)
        clip.model = moved.model
        clip.image_encoder = moved if self.image_encoder is not None else None
        clip.text_encoder = TextEncoder(clip.model) if self.text_encoder is not None else None
        return clip

    def only(self, tower: str) -> "Clip":
        """This Clip with one of its towers: "image" (encode_image; tokenize still works) or "text" (encode_text).

        A new Clip on a new model object that shares the kept tower's weights with this one, which is not changed (the
        other tower's weights are freed once nothing else holds them); its name, fingerprint and sizes are this one's.
        A model without a `visual` tower (not an open_clip model) is kept whole.
        """
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be image or text, got {tower!r}")
        if "visual" not in self.model._modules:
            return self
        kept = {name: m for name, m in self.model._modules.items() if (name == "visual") == (tower == "image")}
        clip = copy.copy(self)
        clip._fingerprint = self.fingerprint
        clip.model = _sharing(self.model, kept)
        clip.text_encoder = TextEncoder(clip.model) if tower == "text" else None
        clip.image_encoder = _sharing(self.image_encoder, {"model": clip.model}) if tower == "image" else None
        return clip

    def token_count(self, prompt: str) -> int | None:
        """Tokens `prompt` takes, start and end tokens included; None where the tokenizer cannot say."""
        encode = getattr(self.tokenizer, "encode", None)
        return len(encode(prompt)) + 2 if callable(encode) else None

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> tokens [len(prompts), context] int64; warns about each prompt that was cut."""
        for prompt in prompts:
            length = self.token_count(prompt)
            if length is not None and length > self.context_length:
                warnings.warn(f"prompt truncated to CLIP's {self.context_length} tokens ({length} given): {prompt[:60]!r}",
                              PromptTruncatedWarning, stacklevel=2)
        return self.tokenizer(prompts).to(torch.long)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> [len(prompts), embed_dim] float32, L2-normalized."""
        self._check_tower(self.text_encoder, "text")
        tokens = self.tokenize(prompts).to(self.device)
        return self.text_encoder(tokens).to(torch.float32)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [batch, 3, H, W] in [-1, 1] -> [batch, embed_dim] float32, L2-normalized; differentiable."""
        self._check_tower(self.image_encoder, "image")
        return self.image_encoder(images.to(self.device)).to(torch.float32)


    def _check_tower(self, encoder, tower: str) -> None:
        if encoder is None:
            raise UsageError(f"this CLIP {self.name} holds its {'image' if tower == 'text' else 'text'} tower only (Clip.only), "
                             f"not its {tower} tower")


def _sharing(module: nn.Module, children: dict) -> nn.Module:
    """A new module object of `module`'s class with its own parameters and buffers (the same tensors) and `children`
    as its submodules: `module` itself is not changed."""
    new = copy.copy(module)
    new.__dict__.update({k: copy.copy(v) for k, v in module.__dict__.items() if isinstance(v, dict)})   # hooks, ...
    new._modules = dict(children)
    return new


def register_tiny_config() -> None:
    import open_clip

    if TINY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR / f"{TINY_MODEL_NAME}.json")


def load_clip(spec: str = DEFAULT_CLIP, device: str | torch.device = "cpu", cache_dir: str | None = None) -> Clip:
    """A CLIP from "MODEL:TAG", "MODEL:/path/to/checkpoint" or "tiny".

    With T2F_OFFLINE=1 (or HF_HUB_OFFLINE=1) the Hugging Face Hub is not contacted: only its cache is read.
    """
    import open_clip

    from .hub import offline_reason, offline_scope

    if cache_dir is None:
        from .download import cache_dir as t2f_cache

        cache_dir = str(t2f_cache() / "clip")
    parsed = ClipSpec.parse(spec)
    register_tiny_config()
    if parsed.model not in open_clip.list_models():
        raise ClipLoadError(f"unknown open_clip model {parsed.model!r}; see open_clip.list_models()")
    try:
        tokenizer = open_clip.get_tokenizer(parsed.model)
    except ImportError as e:            # a Hugging Face tokenizer (SigLIP's, say) without the transformers package
        raise ClipLoadError(f"the tokenizer of {parsed.model} needs the Python package {e.name or 'transformers'}, "
                            f"which is not installed (pip install {e.name or 'transformers'})") from None
    except (OSError, ValueError) as e:  # its files not cached and not downloadable (offline), or not found
        raise ClipLoadError(f"cannot load the tokenizer of {parsed.model}: "
                            f"{first_line(e)}") from None
    if parsed.pretrained is None:
        return Clip(_random_model(parsed.model), tokenizer, parsed).to(device)

    tag_cfg = open_clip.get_pretrained_cfg(parsed.model, parsed.pretrained)
    if not tag_cfg and not Path(parsed.pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(parsed.model)
        raise ClipLoadError(f"{parsed.pretrained!r} is neither a pretrained tag of {parsed.model} (tags: {', '.join(tags) or 'none'}) nor a file")
    if not tag_cfg:
        return Clip(_model_from_checkpoint(parsed.model, parsed.pretrained), tokenizer, parsed).to(device)
    from .private import private_dir

    private_dir(cache_dir, fix="use --cache DIR or set T2F_CACHE to a directory of your own")   # 0700; nobody else swaps weights
    try:
        with offline_scope(offline_reason() is not None):     # open_clip's download takes no local_files_only
            model = open_clip.create_model(parsed.model, pretrained=parsed.pretrained, device="cpu", cache_dir=cache_dir,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    except Exception as e:  # open_clip raises RuntimeError / OSError / hub errors for a failed download
        if tag_cfg:
            where = " or ".join(x for x in (f"hub:{tag_cfg['hf_hub'].rstrip('/')}" if tag_cfg.get("hf_hub") else "",
                                            tag_cfg.get("url", "")) if x) or "its source"
            raise ClipLoadError(
                f"CLIP weights {parsed.model}:{parsed.pretrained} are not cached and could not be downloaded from {where} "
                f"({type(e).__name__}); download the checkpoint and pass --clip {parsed.model}:/path/to/checkpoint") from None
        raise ClipLoadError(f"cannot load CLIP weights {parsed.model}:{parsed.pretrained}: "
                            f"{first_line(e)}") from None
    return Clip(model, tokenizer, parsed).to(device)


def _random_model(model_name: str) -> nn.Module:
    """open_clip's `model_name` with random weights from TINY_SEED, the same on every load.

    open_clip leaves a few tensors uninitialized (CoCa's text_decoder.text_projection is a bare torch.empty), which
    would give the same spec other weights, and so another fingerprint, on each load. The model is made while PyTorch
    fills uninitialized memory with NaN (its deterministic mode, restored after), and those NaNs are set to zero.
    """
    import open_clip

    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.masked_fill_(tensor.isnan(), 0.0)
    return model


def _model_from_checkpoint(model_name: str, path: str) -> nn.Module:
    """An open_clip model with the weights of a local checkpoint, read without torch.load.

    A .safetensors file is read by safetensors; anything else must be a torch zip checkpoint
    (torch.save's format), read by t2f's restricted unpickler: no code from the file runs, and
    its work and memory are bounded by its size (t2f.unpickle). The state dict is then adapted
    as open_clip's own load_checkpoint does (a "state_dict" entry, a "module." prefix, older
    text-tower names, positional embeddings of another length) and loaded strictly.
    """
    import open_clip
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .files import InputPathError, is_regular_file
    from .io import WeightsError
    from .unpickle import safe_load_checkpoint

    try:
        if not is_regular_file(path):
            raise InputPathError(path, "is not a regular file; t2f reads weights from regular files only")
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = safe_load_checkpoint(path)
    except WeightsError as e:
        raise ClipLoadError(f"cannot load CLIP checkpoint {e}") from None
    except (SafetensorError, ValueError) as e:
        raise ClipLoadError(f"cannot load CLIP checkpoint {path}: truncated or corrupt safetensors file ({e})") from None
    except InputPathError as e:
        raise ClipLoadError(f"cannot load CLIP checkpoint {e}") from None
    except OSError as e:
        raise ClipLoadError(f"cannot load CLIP checkpoint {path}: cannot read ({e.strerror or e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items()):
        raise ClipLoadError(f"cannot load CLIP checkpoint {path}: it holds no state dict of named tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    model = _random_model(model_name)
    try:
        state = convert_state_dict(model, dict(state))
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        for name in ("logit_scale", "logit_bias"):
            target = getattr(model, name, None)
            if name in state and target is not None and target.ndim != state[name].ndim:
                state[name] = state[name].reshape(target.shape)
        if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
            state["logit_bias"] = torch.zeros_like(state["logit_scale"])
        state.pop("text.transformer.embeddings.position_ids", None)
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise ClipLoadError(f"cannot load CLIP checkpoint {path}: its weights do not fit {model_name} ({detail[:300]})") from None
    return model
