"""StyleGAN2 generator: our own port of the semantics of NVIDIA's stylegan2-ada-pytorch.

Written for export: modulation is applied to activations (x * style -> conv with the
shared weight -> * demodulation coefficient) instead of a grouped convolution with
groups = batch, the [1,3,3,1] FIR filter is a depthwise convolution with a static channel
count, and no random numbers are drawn in `forward` unless noise_mode="random".

Parameter names follow NVIDIA's (`mapping.fc0.weight`, `synthesis.b8.conv0.affine.bias`, ...)
and parameters keep NVIDIA's equalized-learning-rate storage (gains applied in `forward`),
so converted weights are the published tensors, unchanged.

Precision is passed explicitly (`synthesis(ws, precision=Precision.FP16)`), never read from
a tensor's dtype: in fp16 the blocks at the config's `num_fp16_res` highest resolutions run in
float16, as NVIDIA's networks do on a GPU, while `ws`, the affine layers, the demodulation
coefficients and the RGB image stay in float32.

The architecture is a `GeneratorConfig` (t2f/config.py, validated when made; importable from here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GeneratorConfig
from .errors import UsageError
from .precision import Precision

NOISE_MODES = ("const", "random", "none")


# ----------------------------------------------------------------------------
# Pure functions.


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def truncate(ws: torch.Tensor, w_avg: torch.Tensor, psi: float | torch.Tensor, cutoff: int | None = None) -> torch.Tensor:
    """Truncation trick: w_avg.lerp(w, psi) on the first `cutoff` styles (all if None).

    ws: [batch, num_ws, w_dim]; psi: a number or a tensor broadcastable to [batch, 1, 1].
    """
    w_avg = w_avg.to(ws.dtype)
    if cutoff is None:
        return w_avg.lerp(ws, psi)
    return torch.cat([w_avg.lerp(ws[:, :cutoff], psi), ws[:, cutoff:]], dim=1)


def lrelu(x: torch.Tensor, gain: float = math.sqrt(2)) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * gain


def fir_filter(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The [1,3,3,1] separable FIR filter, normalized to sum 1: [4, 4]."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    f = torch.outer(f, f)
    return (f / f.sum()).to(dtype=dtype, device=device)


def fir_kernel(channels: int, gain: float) -> torch.Tensor:
    """The depthwise [1,3,3,1] kernel for `channels` channels, scaled by `gain`: [channels, 1, 4, 4]."""
    return (fir_filter() * gain).expand(channels, 1, 4, 4).contiguous()


def blur(x: torch.Tensor, kernel: torch.Tensor, pad: int) -> torch.Tensor:
    """Depthwise FIR filter (`fir_kernel`) with `pad` zeros on each side."""
    return conv2d(x, kernel.to(x.dtype), padding=pad, groups=kernel.shape[0])


def upsample2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """2x up-sampling: zero insertion and the FIR filter (`fir_kernel` with gain 4), as one transposed conv."""
    return conv2d(x, kernel.to(x.dtype), stride=2, padding=1, groups=kernel.shape[0], transposed=True)


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0, groups: int = 1,
           transposed: bool = False) -> torch.Tensor:
    """Every convolution of the synthesis network: F.conv2d, or F.conv_transpose2d with transposed=True.

    fp16 on the CPU is computed through fp32 (rounded back to fp16), as ONNX Runtime's CPU provider
    does: PyTorch's CPU fp16 convolutions are about 100x slower, which made tracing a 1024 px fp16
    synthesis graph for export take 20 minutes. Traced for ONNX, it is the one fp16 Conv it stands for.
    Eager fp16 runs only on CUDA otherwise (Precision.check_device).
    """
    if x.dtype == torch.float16 and x.device.type == "cpu":
        return _CpuHalfConv.apply(x, weight, int(stride), int(padding), int(groups), bool(transposed))
    fn = F.conv_transpose2d if transposed else F.conv2d
    return fn(x, weight, stride=stride, padding=padding, groups=groups)


class _CpuHalfConv(torch.autograd.Function):
    """fp16 convolution on the CPU through fp32; exports as a plain ONNX Conv / ConvTranspose (inference only)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, groups, transposed):
        fn = F.conv_transpose2d if transposed else F.conv2d
        return fn(x.float(), weight.float(), stride=stride, padding=padding, groups=groups).to(x.dtype)

    @staticmethod
    def symbolic(g, x, weight, stride, padding, groups, transposed):
        return g.op("ConvTranspose" if transposed else "Conv", x, weight, strides_i=[stride] * 2, pads_i=[padding] * 4,
                    group_i=groups, dilations_i=[1, 1])


# ----------------------------------------------------------------------------
# Layers.


class FullyConnected(nn.Module):
    """Equalized-learning-rate linear layer: weight and bias stored unscaled, gains applied here."""

    def __init__(self,
        in_features: int,                # Input features.
        out_features: int,               # Output features.
        bias_init: float = 0.0,          # Initial bias value (before the lr multiplier).
        lr_multiplier: float = 1.0,      # Learning-rate multiplier.
        activation: str = "linear",      # "linear" or "lrelu".
    ):
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return lrelu(x.matmul(w.t()) + b)


class MappingNetwork(nn.Module):
    """z [batch, z_dim] -> ws [batch, num_ws, w_dim]."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws = config.z_dim, config.w_dim, config.num_ws
        self.num_layers = config.mapping_layers
        for i in range(config.mapping_layers):
            in_features = config.z_dim if i == 0 else config.w_dim
            layer = FullyConnected(in_features, config.w_dim, lr_multiplier=config.mapping_lr_multiplier, activation="lrelu")
            setattr(self, f"fc{i}", layer)
        self.register_buffer("w_avg", torch.zeros([config.w_dim]))

    def forward(self,
        z: torch.Tensor,                          # [batch, z_dim]
        truncation_psi: float = 1.0,              # 1 = no truncation, 0 = the average w.
        truncation_cutoff: int | None = None,     # Truncate only the first styles; None = all.
    ) -> torch.Tensor:
        x = normalize_2nd_moment(z.to(torch.float32))
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        ws = x.unsqueeze(1).expand(-1, self.num_ws, -1)  # [batch, num_ws, w_dim]
        if truncation_psi != 1:
            ws = truncate(ws, self.w_avg, truncation_psi, truncation_cutoff)
        return ws.contiguous()


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x up-sampling), noise, bias, leaky ReLU, clamp."""

    def __init__(self,
        in_channels: int,                # Input channels.
        out_channels: int,               # Output channels.
        w_dim: int,                      # Intermediate latent dimension.
        resolution: int,                 # Output resolution (size of the constant noise).
        up: bool = False,                # 2x up-sampling transposed conv followed by the FIR filter.
        conv_clamp: float | None = None, # Clamp the output to +-conv_clamp; None = no clamping.
    ):
        super().__init__()
        self.up, self.conv_clamp, self.resolution = up, conv_clamp, resolution
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 3, 3]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        if up:  # static-shape FIR kernel (not saved): keeps the graph exportable with a dynamic batch
            self.register_buffer("blur_kernel", fir_kernel(out_channels, gain=4), persistent=False)

    def conv_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight-only part of the layer for a block running in `dtype`: (convolution weight in `dtype`,
        transposed for the up-sampling conv; demodulation matrix [in_channels, out_channels] float32)."""
        weight = self.weight
        if dtype == torch.float16:
            # Pre-normalize to keep fp16 in range; demodulation cancels the scale.
            weight = weight * (1 / math.sqrt(weight[0].numel()) / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        demod = weight.square().sum(dim=[2, 3]).t()
        conv = weight.to(dtype)
        return (conv.transpose(0, 1) if self.up else conv).contiguous(), demod.contiguous()

    def fold(self, dtype: torch.dtype) -> None:
        """Store `conv_weights(dtype)` (and the FIR kernel in `dtype`) as buffers, so that an exported graph holds
        them as constant weights instead of run-time ops. Weights changed afterwards are not seen: for export."""
        conv, demod = (t.detach().clone() for t in self.conv_weights(dtype))
        self.register_buffer("folded_conv", conv, persistent=False)
        self.register_buffer("folded_demod", demod, persistent=False)
        if self.up:
            self.register_buffer("blur_kernel", self.blur_kernel.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const", generators: list | None = None) -> torch.Tensor:
        styles = self.affine(w)  # [batch, in_channels], fp32
        if getattr(self, "folded_conv", None) is not None and self.folded_conv.dtype == x.dtype:
            conv, demod = self.folded_conv, self.folded_demod
        else:
            conv, demod = self.conv_weights(x.dtype)
        if x.dtype == torch.float16:
            styles = styles / styles.abs().amax(dim=1, keepdim=True)
        # Demodulation coefficients without materializing per-sample weights: [batch, out_channels].
        dcoefs = (styles.square() @ demod + 1e-8).rsqrt()

        x = x * styles.to(x.dtype)[:, :, None, None]
        if self.up:
            x = conv2d(x, conv, stride=2, transposed=True)
            x = blur(x, self.blur_kernel, pad=1)
        else:
            x = conv2d(x, conv, padding=1)
        x = x * dcoefs.to(x.dtype)[:, :, None, None]

        if noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        elif noise_mode == "random":
            shape = [1, self.resolution, self.resolution]
            if generators is None:           # torch's global generator
                noise = torch.randn([x.shape[0], *shape], device=x.device, dtype=torch.float32)
            else:                            # one generator per row: a row's noise depends only on its own seed
                noise = torch.stack([torch.randn(shape, device=x.device, dtype=torch.float32, generator=g) for g in generators])
            x = x + (noise * self.noise_strength).to(x.dtype)
        x = lrelu(x + self.bias.to(x.dtype)[None, :, None, None])
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation, bias, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def fold(self, dtype: torch.dtype) -> None:
        """Store the weight in `dtype` as a buffer: a constant weight in exported graphs (see SynthesisLayer.fold)."""
        self.register_buffer("folded_weight", self.weight.detach().to(dtype).clone(), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain  # [batch, in_channels]
        folded = getattr(self, "folded_weight", None)
        weight = folded if folded is not None and folded.dtype == x.dtype else self.weight.to(x.dtype)
        x = conv2d(x * styles.to(x.dtype)[:, :, None, None], weight)
        x = x + self.bias.to(x.dtype)[None, :, None, None]
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class SynthesisBlock(nn.Module):
    """One resolution of the "skip" architecture: (up-conv,) conv, ToRGB, RGB skip."""

    def __init__(self,
        in_channels: int,                # Input channels; 0 = the 4x4 block with a learned constant.
        out_channels: int,               # Output channels.
        w_dim: int,                      # Intermediate latent dimension.
        resolution: int,                 # Resolution of this block.
        img_channels: int,               # Output image channels.
        use_fp16: bool,                  # Run in fp16 at Precision.FP16.
        conv_clamp: float | None,        # Activation clamp; None = no clamping.
    ):
        super().__init__()
        self.in_channels, self.resolution, self.use_fp16 = in_channels, resolution, use_fp16
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        if in_channels != 0:
            self.register_buffer("up_kernel", fir_kernel(img_channels, gain=4), persistent=False)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def forward(self,
        x: torch.Tensor | None,          # [batch, in_channels, res/2, res/2]; None for the first block.
        img: torch.Tensor | None,        # [batch, img_channels, res/2, res/2] fp32; None for the first block.
        ws: torch.Tensor,                # [batch, num_conv + num_torgb, w_dim] fp32
        dtype: torch.dtype,              # Compute dtype of this block.
        noise_mode: str,
        generators: list | None = None,  # noise_mode "random": one torch.Generator per row; None = torch's global one.
        memory_format: torch.memory_format = torch.contiguous_format,   # Layout of the first block's activations (NCHW,
                                         # or torch.channels_last: NHWC); every later convolution keeps its input's.
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            if memory_format != torch.contiguous_format:
                x = x.contiguous(memory_format=memory_format)
            x = self.conv1(x, ws[:, 0], noise_mode, generators)
        else:
            x = self.conv0(x.to(dtype), ws[:, 0], noise_mode, generators)
            x = self.conv1(x, ws[:, 1], noise_mode, generators)
        y = self.torgb(x, ws[:, self.num_conv]).to(torch.float32)
        img = y if img is None else upsample2d(img, self.up_kernel) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [batch, num_ws, w_dim] -> image [batch, img_channels, resolution, resolution] float32 in about [-1, 1]."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.w_dim, self.num_ws, self.resolution = config.w_dim, config.num_ws, config.resolution
        self.img_channels = config.img_channels
        self.block_resolutions = config.block_resolutions
        for res in self.block_resolutions:
            block = SynthesisBlock(
                in_channels=config.channels(res // 2) if res > 4 else 0,
                out_channels=config.channels(res),
                w_dim=config.w_dim,
                resolution=res,
                img_channels=config.img_channels,
                use_fp16=res >= config.fp16_resolution,
                conv_clamp=config.conv_clamp,
            )
            setattr(self, f"b{res}", block)

    def block_dtype(self, block: SynthesisBlock, precision: Precision) -> torch.dtype:
        """The dtype a block runs in: the reduced precision's (fp16 or bf16) for the generator's fp16 blocks, else float32."""
        return precision.dtype if precision.reduced and block.use_fp16 else torch.float32

    def fold(self, precision: Precision) -> None:
        """Fold every layer's weight-only computation for `precision` into buffers (for export; see SynthesisLayer.fold)."""
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            for layer in (getattr(block, "conv0", None), block.conv1, block.torgb):
                if layer is not None:
                    layer.fold(self.block_dtype(block, precision))

    def forward(self,
        ws: torch.Tensor,                         # [batch, num_ws, w_dim], used in float32 whatever the precision.
        noise_mode: str = "const",                # "const", "random" or "none".
        precision: Precision = Precision.FP32,    # FP16 / BF16: the fp16 blocks run in that 16-bit type.
        noise_seeds: list[int] | None = None,     # noise_mode "random": one seed per row (its noise depends on it alone);
                                                  # None = torch's global generator.
        memory_format: torch.memory_format = torch.contiguous_format,    # Activations' layout: NCHW, or
                                                  # torch.channels_last (NHWC; the image is then NHWC in memory too).
    ) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise UsageError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        precision = Precision.parse(precision)
        ws = ws.to(torch.float32)
        generators = None
        if noise_mode == "random" and noise_seeds is not None:
            if len(noise_seeds) != ws.shape[0]:
                raise UsageError(f"{len(noise_seeds)} noise seeds for {ws.shape[0]} rows")
            generators = [torch.Generator(ws.device).manual_seed(int(s)) for s in noise_seeds]
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            dtype = self.block_dtype(block, precision)
            block_ws = ws[:, w_idx : w_idx + block.num_conv + block.num_torgb]
            x, img = block(x, img, block_ws, dtype, noise_mode, generators, memory_format)
            w_idx += block.num_conv
        return img


class Generator(nn.Module):
    """StyleGAN2 generator: `mapping(z) -> ws`, `synthesis(ws) -> image`; `forward` chains them."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.z_dim, self.w_dim, self.resolution = config.z_dim, config.w_dim, config.resolution
        self.img_channels = config.img_channels
        self.num_ws = config.num_ws
        self.mapping = MappingNetwork(config)
        self.synthesis = SynthesisNetwork(config)

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(self,
        z: torch.Tensor,                          # [batch, z_dim]
        truncation_psi: float = 1.0,              # 1 = no truncation.
        truncation_cutoff: int | None = None,     # Truncate only the first styles; None = all.
        noise_mode: str = "const",                # "const", "random" or "none".
    ) -> torch.Tensor:
        ws = self.mapping(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode)


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """Float NCHW image in [-1, 1] -> uint8 NHWC, as NVIDIA's scripts convert."""
    return (img.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
