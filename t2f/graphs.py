"""The three exported graphs, as thin modules with one job each.

TextEncoderGraph:  tokens [B, context] int32 -> embedding [B, D] float32, L2-normalized
MapperGraph:       embedding [B, D], z [B, z_dim], psi [B] (float32) -> ws [B, num_ws, w_dim] float32
SynthesisGraph:    ws [B, num_ws, w_dim] float32 -> image [B, H, W, C] uint8 (or float NCHW for parity checks)

Token ids are int32 and the end-of-text position is found by ArgMax over a float copy:
TensorRT's ArgMax does not take int64. In fp16 the text encoder keeps LayerNorm and softmax
in fp32, the synthesis network runs the generator's fp16 resolutions in half precision with
its activation clamp, and its demodulation coefficients are always computed in fp32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .mapper import Mapper
from .stylegan2 import Generator, to_uint8, truncate


class ExportError(Exception):
    """A model that cannot be exported as asked."""


def _layer_norm_fp32(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(x.dtype)


class TextEncoderGraph(nn.Module):
    """CLIP's text tower, rewritten for export: int32 tokens, fp32 LayerNorm and softmax."""

    def __init__(self, clip_model: nn.Module, half: bool = False):
        super().__init__()
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
        missing = [n for n in needed if getattr(clip_model, n, None) is None]
        pool = getattr(clip_model, "text_pool_type", "argmax")
        if missing or pool != "argmax" or not hasattr(clip_model.transformer, "resblocks"):
            raise ExportError("only open_clip's built-in CLIP text tower (argmax pooling) can be exported")
        for block in clip_model.transformer.resblocks:
            if not isinstance(block.attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
                raise ExportError("unsupported attention block in the CLIP text tower")
        self.token_embedding = copy.deepcopy(clip_model.token_embedding)
        self.positional_embedding = nn.Parameter(clip_model.positional_embedding.detach().clone())
        self.resblocks = copy.deepcopy(clip_model.transformer.resblocks)
        self.ln_final = copy.deepcopy(clip_model.ln_final)
        projection = clip_model.text_projection
        weight = projection.weight.detach().t() if isinstance(projection, nn.Linear) else projection.detach()
        self.text_projection = nn.Parameter(weight.clone())
        self.register_buffer("attn_mask", clip_model.attn_mask.detach().clone().float())
        self.dtype = torch.float16 if half else torch.float32
        self.requires_grad_(False).eval()
        if half:
            self.half()
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.float()
            self.attn_mask = self.attn_mask.float()

    def _attention(self, attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads = attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))   # [B, heads, n, d/heads]
        scores = (q @ k.transpose(-1, -2)).float() * (d // heads) ** -0.5 + self.attn_mask[:n, :n]
        out = scores.softmax(dim=-1).to(x.dtype) @ v
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding.to(self.dtype)  # [B, n, width]
        for block in self.resblocks:
            x = x + block.ls_1(self._attention(block.attn, _layer_norm_fp32(block.ln_1, x)))
            x = x + block.ls_2(block.mlp(_layer_norm_fp32(block.ln_2, x)))
        x = _layer_norm_fp32(self.ln_final, x)
        eot = tokens.float().argmax(dim=-1)                                   # the end token has the largest id
        x = torch.gather(x, 1, eot[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)
        return F.normalize((x @ self.text_projection).float(), dim=-1)


class MapperGraph(nn.Module):
    """(embedding, z, psi) -> truncated ws, in fp32 (the mapper is small)."""

    def __init__(self, mapper: Mapper, w_avg: torch.Tensor):
        super().__init__()
        self.mapper = copy.deepcopy(mapper).float().eval().requires_grad_(False)
        self.register_buffer("w_avg", w_avg.detach().clone().float())

    def forward(self, embedding: torch.Tensor, z: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        return truncate(self.mapper(embedding, z), self.w_avg, psi.reshape(-1, 1, 1))


class SynthesisGraph(nn.Module):
    """ws -> image with constant noise; uint8 [B, H, W, C] in the graph, so no float image leaves the device."""

    def __init__(self, generator: Generator, half: bool = False, uint8: bool = True):
        super().__init__()
        self.synthesis = copy.deepcopy(generator.synthesis).eval().requires_grad_(False)
        self.half_ws, self.uint8 = half, uint8

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        img = self.synthesis(ws.half() if self.half_ws else ws, noise_mode="const")
        return to_uint8(img) if self.uint8 else img
