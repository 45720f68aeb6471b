"""The three exported graphs: thin modules with one job each, and the models' sizes their specs are made from.

TextEncoderGraph:  tokens [B, context] int32 -> embedding [B, D] float32, L2-normalized
MapperGraph:       embedding [B, D], z [B, z_dim], psi [B] (float32) -> ws [B, num_ws, w_dim] float32
SynthesisGraph:    ws [B, num_ws, w_dim] float32 -> image [B, H, W, C] uint8 (or float NCHW for parity checks)

The text encoder is open_clip's own text tower (`CLIP`, or a `custom_text` config's
TextTransformer) rewritten; `text_tower` reads what it needs from the model, its config and its
tokenizer: the pooling ("argmax" at the tokenizer's end-of-text id, "eos" at the config's
eos_id, "first", "last"), the causal mask or none, the projection (a matrix, a Linear with or
without bias, or none). What it cannot express (a Hugging Face or custom-block tower, a class
token, pooling "none", an end-of-text id that is not the tokenizer's largest) raises
UnsupportedTextTower naming it; the `torch` backend then runs open_clip's own encode_text.
Token ids are int32 and a pooling id's position is found by ArgMax over a 0/1 float mask of
that id (TensorRT's ArgMax does not take int64, and the ids themselves do not survive a
bf16 runtime). No graph holds control flow (If, Loop, Scan): TensorRT's
ONNX parser rejects an If whose branches differ in rank. In fp16 the text encoder keeps LayerNorm
and softmax in fp32 and scales q before q @ k^T (as PyTorch's attention does, so the product
stays in fp16 range); the synthesis network runs the generator's fp16 resolutions in half
precision with its activation clamp, keeps ws and the demodulation coefficients in fp32, and
holds its weight-only computations (fp16 pre-normalization, demodulation matrix, transposes,
casts) as constant weights.

`t2f.specs.GraphSpec` owns everything else about a graph: input and output names, dtypes and
shapes, dynamic axes, example inputs, eager reference, parity metrics, the TensorRT optimization
profile and the artifact file name.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from .errors import T2FError
from .mapper import Mapper
from .precision import Precision
from .stylegan2 import to_uint8, truncate
from .types import StyleGenerator

GRAPHS = ("text_encoder", "mapper", "synthesis")
DEFAULT_PROFILE = (1, 8, 32)        # engines' (MIN, OPT, MAX) batch where none is asked for: t2f-export and every runtime


class ExportError(T2FError):
    """A model that cannot be exported as asked, or artifacts that cannot be used."""


# ----------------------------------------------------------------------------
# The graph modules.


class UnsupportedTextTower(ExportError):
    """A CLIP text tower the exportable rewrite cannot express: open_clip's own encode_text still runs it (`torch`)."""


@dataclasses.dataclass(frozen=True)
class TextTower:
    """An open_clip text tower as the rewrite reads it: its parts, sliced to the tokenizer's context, and where it pools."""
    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor          # [context, width]
    resblocks: nn.ModuleList                    # open_clip ResidualAttentionBlocks (nn.MultiheadAttention)
    ln_final: nn.LayerNorm
    projection: nn.Linear | torch.Tensor | None  # Linear (with or without bias), a [width, D] matrix, or none
    attn_mask: torch.Tensor | None              # [context, context] additive causal mask; None = bidirectional
    pool_token: int | None                      # pool at the first position of this id (argmax: the tokenizer's
                                                # end-of-text id, the largest it emits; eos: the config's eos_id) ...
    pool_index: int | None                      # ... or at this position (pooling "first": 0, "last": context - 1)

    def tensors(self) -> list[torch.Tensor]:
        """Every weight and buffer the rewrite reads."""
        modules = [self.token_embedding, self.resblocks, self.ln_final] + ([self.projection] if isinstance(self.projection, nn.Module) else [])
        loose = [self.positional_embedding, self.attn_mask] + ([self.projection] if isinstance(self.projection, torch.Tensor) else [])
        return [t for m in modules for t in (*m.parameters(), *m.buffers())] + [t for t in loose if t is not None]


def text_tower(clip) -> TextTower:
    """The text tower of `clip` (t2f.clip.Clip) as the rewrite reads it; UnsupportedTextTower, in one line naming what
    it cannot express, for anything else. Reads the model's modules, config and tokenizer; copies nothing."""
    from open_clip.transformer import ResidualAttentionBlock, TextTransformer

    model, name = clip.model, clip.name

    def refuse(what: str) -> NoReturn:      # the one place that says what runs it instead
        raise UnsupportedTextTower(f"{what} of CLIP {name} cannot be exported (--backend torch runs open_clip's own encode_text)")

    text = getattr(model, "text", None)
    if text is None and all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        tower, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)   # open_clip's CLIP: parts on the model
    elif isinstance(text, TextTransformer):     # a custom_text config: CustomTextCLIP (or CoCa) with open_clip's own tower
        tower, pool, eos = text, text.pool_type, text.eos_id
        if text.cls_emb is not None:
            refuse("text pooling on an appended class token (embed_cls)")
        if text.use_pad_mask:
            refuse("the text tower's padding mask")
    elif text is not None:
        refuse(f"the {type(text).__name__} text tower" + (" (a Hugging Face model)" if type(text).__name__ == "HFTextEncoder" else ""))
    else:
        refuse(f"the text tower of {type(model).__name__}")
    blocks = tower.transformer.resblocks
    for block in blocks:
        attn = getattr(block, "attn", None)
        if type(block) is not ResidualAttentionBlock or not isinstance(attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv") \
                or attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            refuse(f"the text tower's {type(block).__name__} attention blocks")
    norms = [tower.ln_final] + [ln for block in blocks for ln in (block.ln_1, block.ln_2)]
    if not all(isinstance(ln, nn.LayerNorm) for ln in norms):
        refuse(f"the text tower's {type(next(ln for ln in norms if not isinstance(ln, nn.LayerNorm))).__name__} normalization")
    context, positions = clip.context_length, tower.positional_embedding.shape[0]
    if context > positions:
        refuse(f"a {context}-token context on {positions} positional embeddings")
    pool_token = pool_index = None
    if pool == "argmax":                        # open_clip pools at argmax(ids): the end-of-text id, if no id is larger
        eot, size = getattr(clip.tokenizer, "eot_token_id", None), getattr(clip.tokenizer, "vocab_size", None)
        if eot is None or size is None:
            refuse(f"text pooling 'argmax' with a {type(clip.tokenizer).__name__} tokenizer (no end-of-text id)")
        if eot != size - 1:
            refuse(f"text pooling 'argmax' with end-of-text id {eot} below the tokenizer's largest id {size - 1}")
        pool_token = int(eot)
    elif pool == "eos" and eos is not None:
        pool_token = int(eos)
    elif pool in ("first", "last"):
        pool_index = 0 if pool == "first" else context - 1
    else:
        refuse(f"text pooling {pool!r}")
    projection = tower.text_projection
    if not (projection is None or isinstance(projection, nn.Linear) or (isinstance(projection, torch.Tensor) and projection.ndim == 2)):
        refuse(f"the text projection {type(projection).__name__}")
    mask = tower.attn_mask
    return TextTower(token_embedding=tower.token_embedding, positional_embedding=tower.positional_embedding[:context],
                     resblocks=blocks, ln_final=tower.ln_final, projection=projection,
                     attn_mask=None if mask is None else mask[:context, :context], pool_token=pool_token, pool_index=pool_index)


def _shared(module: nn.Module) -> nn.Module:
    """A new module tree like `module`'s (every submodule a new object) on the same parameter and buffer tensors:
    switching it to eval leaves `module` as it is."""
    new = copy.copy(module)
    new.__dict__.update({k: copy.copy(v) for k, v in module.__dict__.items() if isinstance(v, dict)})   # hooks, ...
    new._modules = {name: None if child is None else _shared(child) for name, child in module._modules.items()}
    return new


def _layer_norm_fp32(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    weight, bias = (None if t is None else t.float() for t in (ln.weight, ln.bias))
    return F.layer_norm(x.float(), ln.normalized_shape, weight, bias, ln.eps).to(x.dtype)


class TextEncoderGraph(nn.Module):
    """open_clip's text tower (see `text_tower`), rewritten for export: int32 tokens, fp32 LayerNorm and softmax."""

    def __init__(self, clip, precision: Precision = Precision.FP32, share: bool = False):
        """share: hold the tower's own weights instead of copies (fp32 only): its token embedding, attention blocks and
        final LayerNorm as module objects of their own in eval mode on the same tensors, the small tensors (positional
        embedding, projection, mask) copied. The caller's modules are not changed: their requires_grad stays as it
        is, so run it under torch.no_grad. For a backend that runs the tower in fp32 on the device its weights are on."""
        super().__init__()
        precision = Precision.parse(precision)
        if share and precision.reduced:
            raise ValueError(f"a text encoder graph shares the tower's weights in fp32 only, not {precision}")
        tower = text_tower(clip)
        take = _shared if share else copy.deepcopy
        self.token_embedding = take(tower.token_embedding)
        self.positional_embedding = nn.Parameter(tower.positional_embedding.detach().clone(), requires_grad=False)
        self.resblocks = take(tower.resblocks)
        self.ln_final = take(tower.ln_final)
        projection, bias = tower.projection, None
        if isinstance(projection, nn.Linear):
            projection, bias = projection.weight.t(), projection.bias
        self.text_projection = None if projection is None else nn.Parameter(projection.detach().clone(), requires_grad=False)  # [width, D]
        self.text_projection_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("attn_mask", None if tower.attn_mask is None else tower.attn_mask.detach().clone().float())
        self.pool_token, self.pool_index = tower.pool_token, tower.pool_index
        self.dtype = precision.dtype
        self.eval()
        if not share:
            self.requires_grad_(False)
        if precision.reduced:
            self.to(precision.dtype)
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.float()
            if self.attn_mask is not None:
                self.attn_mask = self.attn_mask.float()

    def _attention(self, attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads = attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))   # [B, heads, n, d/heads]
        q = q * float(attn.head_dim) ** -0.5               # a constant, scaled before the product (stays in fp16 range)
        scores = (q @ k.transpose(-1, -2)).float()
        if self.attn_mask is not None:
            scores = scores + self.attn_mask
        out = scores.softmax(dim=-1).to(x.dtype) @ v
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding.to(self.dtype)  # [B, n, width]
        for block in self.resblocks:
            x = x + block.ls_1(self._attention(block.attn, _layer_norm_fp32(block.ln_1, x)))
            x = x + block.ls_2(block.mlp(_layer_norm_fp32(block.ln_2, x)))
        x = _layer_norm_fp32(self.ln_final, x)
        if self.pool_token is not None:
            # The first position of the pooling id, found by comparing ids as integers: a float copy of the ids
            # (49406 and 49407 are one value in bfloat16) lost it in a bf16 runtime, and TensorRT's ArgMax takes no int64.
            position = (tokens == self.pool_token).to(torch.float32).argmax(dim=-1)
            x = torch.gather(x, 1, position[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]   # [B, width]; no Squeeze/If
        else:
            x = x[:, self.pool_index]                                                      # [B, width]
        if self.text_projection is not None:
            x = x @ self.text_projection
        if self.text_projection_bias is not None:
            x = x + self.text_projection_bias
        return F.normalize(x.float(), dim=-1)


class MapperGraph(nn.Module):
    """(embedding, z, psi) -> truncated ws, in fp32 (the mapper is small)."""

    def __init__(self, mapper: Mapper, w_avg: torch.Tensor):
        super().__init__()
        self.mapper = copy.deepcopy(mapper).float().eval().requires_grad_(False)
        self.register_buffer("w_avg", w_avg.detach().clone().float())

    def forward(self, embedding: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return truncate(self.mapper(embedding, z), self.w_avg, psi.reshape(-1, 1, 1))


class SynthesisGraph(nn.Module):
    """ws -> image with constant noise; uint8 [B, H, W, C] in the graph, so no float image leaves the device.

    The weight-only computations are folded into constant buffers for `precision` (see SynthesisLayer.fold). With
    memory_format=torch.channels_last the folded weights and every activation are NHWC in memory (same values).
    """

    def __init__(self, generator: StyleGenerator, precision: Precision = Precision.FP32, uint8: bool = True,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.precision = Precision.parse(precision)
        self.synthesis = copy.deepcopy(generator.synthesis).eval().requires_grad_(False)
        self.synthesis.fold(self.precision)
        self.uint8, self.memory_format = uint8, memory_format
        if memory_format != torch.contiguous_format:
            self.synthesis.to(memory_format=memory_format)          # the 4-d weights and kernels: this module's own copy

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        img = self.synthesis(ws, noise_mode="const", precision=self.precision, memory_format=self.memory_format)
        return to_uint8(img) if self.uint8 else img


# ----------------------------------------------------------------------------
# The models' sizes (what the graph specs, t2f.specs, are made from).


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The sizes the graphs' interfaces depend on, from the models or from an export manifest."""
    context_length: int
    embed_dim: int
    z_dim: int
    num_ws: int
    w_dim: int
    resolution: int
    img_channels: int

    @classmethod
    def of(cls, generator: StyleGenerator, clip, mapper: Mapper) -> "ModelDims":
        return cls(context_length=clip.context_length, embed_dim=clip.embed_dim, z_dim=mapper.z_dim, num_ws=generator.num_ws,
                   w_dim=generator.w_dim, resolution=generator.resolution, img_channels=generator.img_channels)

    @classmethod
    def from_manifest(cls, models: dict) -> "ModelDims":
        """From a manifest's "models" record; ExportError when a field is missing (an older export)."""
        g, c, m = (models.get(k) or {} for k in ("generator", "clip", "mapper"))
        try:
            return cls(context_length=int(c["context_length"]), embed_dim=int(c["embed_dim"]), z_dim=int(m["z_dim"]),
                       num_ws=int(g["num_ws"]), w_dim=int(g["w_dim"]), resolution=int(g["resolution"]),
                       img_channels=int(g["img_channels"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"the manifest does not record the models' sizes ({e}); run t2f-export again") from None


def example_tokens(clip, batch: int, seed: int) -> torch.Tensor:
    """Valid token rows of random lengths, int32 [batch, context], laid out as the tokenizer lays out a prompt: its
    leading special ids (start of text), random ordinary ids, then what follows an empty prompt (end of text, padding)."""
    g = torch.Generator().manual_seed(seed)
    ctx = clip.context_length
    empty, one = clip.tokenize(["", "a"]).tolist()
    lead = next(i for i, (a, b) in enumerate(zip(empty + [None], one + [None])) if a != b)   # ids before any text
    tail = empty[lead:]                                                                     # end of text, padding
    special = set(empty) | set(one[:lead])
    try:                                # ids the tower has embeddings for (a tokenizer may count more)
        vocab = min(clip.vocab_size, text_tower(clip).token_embedding.num_embeddings)
    except UnsupportedTextTower:
        vocab = clip.vocab_size
    ordinary = torch.tensor([i for i in range(vocab) if i not in special])
    tokens = torch.zeros([batch, ctx], dtype=torch.int32)
    for i in range(batch):
        n = int(torch.randint(1, ctx - lead, [1], generator=g))                             # at least one id of the tail stays
        text = ordinary[torch.randint(0, len(ordinary), [n], generator=g)].tolist()
        tokens[i] = torch.tensor((empty[:lead] + text + tail)[:ctx], dtype=torch.int32)
    return tokens
