"""Distance to the limit: FLOP counts of the stages (checked against counts written out by hand), the peak, the arithmetic."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from t2f.engine import roofline
from t2f.engine.roofline import count_flops, distance, peak_gflops, stage_flops
from t2f.graphs import ModelDims
from t2f.specs import graph_specs
from t2f.precision import Precision
from t2f.presets import random_mapper


@pytest.fixture(scope="module")
def models(tiny_generator, tiny_clip):
    return tiny_generator, tiny_clip, random_mapper(tiny_generator, tiny_clip.embed_dim)


# ----------------------------------------------------------------------------
# Counts written out by hand, in multiply-adds (FLOPs are twice these).


def synthesis_macs(config, img_channels: int = 3) -> dict[str, int]:
    """Multiply-adds per image of t2f's synthesis network, by kind, from its config alone."""
    macs = dict(conv=0, affine=0, demod=0, up_conv=0, blur=0, rgb_up=0)
    for r in config.block_resolutions:
        c_in, c_out = (config.channels(r // 2) if r > 4 else 0), config.channels(r)
        if c_in:                                                # conv0: modulated 3x3 transposed conv, stride 2
            macs["affine"] += config.w_dim * c_in
            macs["demod"] += c_in * c_out
            macs["up_conv"] += c_in * c_out * 9 * (r // 2) ** 2    # at its input resolution
            macs["blur"] += c_out * 16 * r**2                   # depthwise 4x4 FIR on the (r + 1)^2 result, pad 1
            macs["rgb_up"] += img_channels * 16 * (r // 2) ** 2  # depthwise transposed FIR of the RGB skip
        macs["affine"] += config.w_dim * c_out + config.w_dim * c_out   # conv1's and ToRGB's styles
        macs["demod"] += c_out * c_out
        macs["conv"] += c_out * c_out * 9 * r**2 + c_out * img_channels * r**2   # conv1, ToRGB
    return macs


def text_encoder_macs(clip_model) -> int:
    """Multiply-adds per row of the text tower: projections, both attention products, the MLP, the final projection."""
    n, width = clip_model.positional_embedding.shape
    per_layer = 0
    for block in clip_model.transformer.resblocks:
        hidden = block.mlp.c_fc.out_features
        per_layer += n * width * 3 * width + 2 * n * n * width + n * width * width + 2 * n * width * hidden
    return per_layer + clip_model.text_projection.numel()      # one row (the end token) is projected


# ----------------------------------------------------------------------------
# What the counter counts.


def test_linear_and_conv_known_counts():
    linear = nn.Linear(7, 3)
    assert count_flops(linear, torch.randn(5, 7)) == 2 * 5 * 7 * 3
    conv = nn.Conv2d(4, 6, 3, padding=1)
    assert count_flops(conv, torch.randn(2, 4, 8, 8)) == 2 * 2 * 6 * 4 * 9 * 8 * 8


def test_grouped_and_transposed_convs_are_counted_at_their_true_size():
    x, fir = torch.randn(2, 8, 16, 16), torch.randn(8, 1, 4, 4)
    assert count_flops(lambda x: F.conv2d(x, fir, padding=1, groups=8), x) == 2 * 2 * 8 * 16 * 15 * 15
    assert count_flops(lambda x: F.conv_transpose2d(x, fir, stride=2, padding=1, groups=8), x) == 2 * 2 * 8 * 16 * 16 * 16
    weight = torch.randn(8, 4, 3, 3)                            # transposed layout [in, out, 3, 3]
    assert count_flops(lambda x: F.conv_transpose2d(x, weight, stride=2), x) == 2 * 2 * 8 * 4 * 9 * 16 * 16


def test_cpu_attention_kernel_is_counted():
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 12, 16)
    assert count_flops(F.scaled_dot_product_attention, q, k, k) == 2 * 2 * 2 * 4 * 10 * 12 * 16


# ----------------------------------------------------------------------------
# The stages.


def test_synthesis_counts_every_conv_including_blur_and_upsampling(models):
    generator = models[0]
    macs = synthesis_macs(generator.config)
    assert macs["blur"] > 0 and macs["rgb_up"] > 0 and macs["up_conv"] > 0
    flops = stage_flops(*models, batch=2)
    assert flops["synthesis"] == 2 * 2 * sum(macs.values())     # dropping the FIR convs would miss this by their share


def test_text_encoder_count_includes_attention_products(models):
    flops = stage_flops(*models, batch=3)
    assert flops["text_encoder"] == 2 * 3 * text_encoder_macs(models[1].model)


def test_counts_are_proportional_to_batch_and_sum_to_end_to_end(models):
    one, five = stage_flops(*models, batch=1), stage_flops(*models, batch=5)
    for stage in roofline.STAGES:
        assert one[stage] > 0 and five[stage] == 5 * one[stage]
    assert one["end_to_end"] == one["text_encoder"] + one["mapper"] + one["synthesis"]


def test_meta_count_equals_a_real_run(models):
    """The count on the meta device is the count of the modules computing on real tensors."""
    generator, clip, mapper = models
    flops = stage_flops(*models, batch=2)
    for name, spec in graph_specs(ModelDims.of(generator, clip, mapper)).items():
        module = spec.module(generator, clip, mapper, Precision.FP32)
        assert count_flops(module, *spec.example_inputs(2, 1, generator, clip, mapper)) == flops[name], name


def test_stage_flops_refuses_a_bad_batch(models):
    with pytest.raises(ValueError, match="batch"):
        stage_flops(*models, batch=0)


# ----------------------------------------------------------------------------
# The peak.


def test_peak_fp32_on_cpu_is_a_positive_rate():
    gflops = peak_gflops("cpu", torch.float32, seconds=0.0, size=256)
    assert isinstance(gflops, float) and math.isfinite(gflops) and gflops > 0


def test_peak_refuses_what_the_cpu_cannot_run(monkeypatch):
    assert peak_gflops("cpu", torch.float16) is None            # t2f runs fp16 on CUDA only
    monkeypatch.setattr(roofline, "cpu_has_bf16", lambda: False)
    assert peak_gflops("cpu", torch.bfloat16) is None
    monkeypatch.setattr(roofline, "cpu_has_bf16", lambda: True)
    assert roofline.peak_runs("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        peak_gflops("cpu", torch.int8)


def test_bf16_flag_is_read_from_cpuinfo():
    assert roofline.has_bf16_flag("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 sse\n")
    assert roofline.has_bf16_flag("flags\t: fpu amx_tile amx_bf16\n")
    assert not roofline.has_bf16_flag("flags\t: fpu avx512f avx512_fp16\n")
    assert not roofline.has_bf16_flag("processor\t: 0\n")
    assert isinstance(roofline.cpu_has_bf16(), bool)


@pytest.mark.gpu
def test_peak_on_cuda_is_a_positive_rate_in_each_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        gflops = peak_gflops("cuda", dtype, seconds=0.0, size=2048)
        assert gflops is not None and math.isfinite(gflops) and gflops > 0, dtype


# ----------------------------------------------------------------------------
# The distance.


def test_distance_arithmetic():
    assert distance(30e9, 100.0, 600.0) == pytest.approx(dict(gflops_per_s=300.0, share_of_peak=0.5))
    assert distance(1.5e9, 2.0, None) == dict(gflops_per_s=pytest.approx(750.0), share_of_peak=None)
    with pytest.raises(ValueError, match="ms"):
        distance(1e9, 0.0, 100.0)
    with pytest.raises(ValueError, match="flops"):
        distance(-1.0, 1.0, 100.0)
