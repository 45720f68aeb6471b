"""StyleGAN2 weights in: NVIDIA pickles, rosinality checkpoints and converted directories, to our Generator.

Files are read by the restricted unpickler (`t2f.unpickle`), which never runs code from them.
Conversion is an explicit name table per source format; every tensor of our generator must be
matched with the right shape and every source tensor used (or checked, for fixed filters), or
the import fails naming what did not match.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import first_line
from .files import is_regular_file, open_regular_file
from .io import WeightsError, build_checked, load_model_dir, save_model_dir
from .stylegan2 import Generator, GeneratorConfig, fir_filter
from .unpickle import MAX_PICKLE_DEPTH, PersistentRecord, safe_load_checkpoint, safe_unpickle

__all__ = ["GENERATOR_KIND", "PersistentRecord", "convert_nvidia", "convert_rosinality", "import_generator",
           "load_generator_dir", "load_nvidia_pickle", "load_rosinality", "safe_load_checkpoint", "safe_unpickle",
           "save_generator"]

GENERATOR_KIND = "stylegan2-generator"


# ----------------------------------------------------------------------------
# NVIDIA pickles.

_NVIDIA_MAPPING_KEYS = {"num_layers", "lr_multiplier", "w_avg_beta", "activation", "embed_features", "layer_features"}
_NVIDIA_SYNTHESIS_KEYS = {"channel_base", "channel_max", "num_fp16_res", "conv_clamp", "architecture", "resample_filter",
                          "use_noise", "fused_modconv_default", "fp16_channels_last", "channels_last", "activation"}
_NVIDIA_GENERATOR_KEYS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs"}


def _flatten_record(record: PersistentRecord, prefix: str = "", seen: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a persistent nn.Module record, by dotted name; each submodule is visited once
    (a submodule reached twice is refused: StyleGAN2 generators share none)."""
    seen = set() if seen is None else seen
    if id(record) in seen:
        raise WeightsError(f"submodule {prefix.rstrip('.') or 'the top'} appears more than once in the network")
    if prefix.count(".") >= MAX_PICKLE_DEPTH:
        raise WeightsError(f"modules nested deeper than {MAX_PICKLE_DEPTH} at {prefix[:200]}")
    seen.add(id(record))
    out = {}
    state = record.state
    for group in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(group) or {}, dict):
            raise WeightsError(f"malformed module record at {prefix or 'the top'}: {group} is not a mapping")
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None:
                if not isinstance(tensor, torch.Tensor) or not isinstance(name, str):
                    raise WeightsError(f"{prefix}{name} is not a tensor")
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord) or not isinstance(name, str):
            raise WeightsError(f"unsupported submodule {prefix}{name} ({type(child).__name__})")
        out.update(_flatten_record(child, f"{prefix}{name}.", seen))
    return out


def _nvidia_config(kwargs: dict, source: str) -> GeneratorConfig:
    """Our config from a Generator's init_kwargs: stylegan2-ada-pytorch nests the synthesis options in
    `synthesis_kwargs` (num_fp16_res defaults to 0); stylegan3-release's StyleGAN2 takes them at the top
    level (num_fp16_res defaults to 4)."""
    mapping = kwargs.get("mapping_kwargs") or {}
    if "synthesis_kwargs" in kwargs:
        synthesis = kwargs.get("synthesis_kwargs") or {}
        default_fp16_res = 0
    else:
        synthesis = {k: v for k, v in kwargs.items() if k not in _NVIDIA_GENERATOR_KEYS}
        default_fp16_res = 4
    if not isinstance(mapping, dict) or not isinstance(synthesis, dict):
        raise WeightsError(f"{source}: malformed generator init_kwargs")
    mapping, synthesis = dict(mapping), dict(synthesis)
    if kwargs.get("c_dim", 0):
        raise WeightsError(f"{source}: conditional generators (c_dim={kwargs['c_dim']}) are not supported")
    unknown = sorted(set(mapping) - _NVIDIA_MAPPING_KEYS) + sorted(set(synthesis) - _NVIDIA_SYNTHESIS_KEYS)
    if unknown:
        raise WeightsError(f"{source}: unsupported generator options {unknown}")
    if synthesis.get("architecture", "skip") != "skip":
        raise WeightsError(f"{source}: only the 'skip' synthesis architecture is supported, got {synthesis['architecture']!r}")
    if mapping.get("activation", "lrelu") != "lrelu" or synthesis.get("activation", "lrelu") != "lrelu":
        raise WeightsError(f"{source}: only the lrelu activation is supported")
    if list(synthesis.get("resample_filter", [1, 3, 3, 1])) != [1, 3, 3, 1]:
        raise WeightsError(f"{source}: only the [1,3,3,1] resample filter is supported")
    if synthesis.get("use_noise", True) is False:
        raise WeightsError(f"{source}: generators without noise inputs are not supported")
    for key in ("embed_features", "layer_features"):
        if mapping.get(key) not in (None, kwargs.get("w_dim")):
            raise WeightsError(f"{source}: mapping {key}={mapping[key]} is not supported")
    try:
        return GeneratorConfig(
            resolution=_integer(kwargs["img_resolution"], "img_resolution"),
            z_dim=_integer(kwargs["z_dim"], "z_dim"),
            w_dim=_integer(kwargs["w_dim"], "w_dim"),
            img_channels=_integer(kwargs["img_channels"], "img_channels"),
            mapping_layers=_integer(mapping.get("num_layers", 8), "num_layers"),
            mapping_lr_multiplier=_number(mapping.get("lr_multiplier", 0.01), "lr_multiplier"),
            channel_base=_integer(synthesis.get("channel_base", 32768), "channel_base"),
            channel_max=_integer(synthesis.get("channel_max", 512), "channel_max"),
            num_fp16_res=_integer(synthesis.get("num_fp16_res", default_fp16_res), "num_fp16_res"),
            conv_clamp=None if synthesis.get("conv_clamp") is None else _number(synthesis["conv_clamp"], "conv_clamp"),
        )
    except KeyError as e:
        raise WeightsError(f"{source}: generator init_kwargs lack {e}") from None
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{source}: invalid generator options: {e}") from None


def _integer(value, name: str) -> int:
    """An int, or a float with an integral finite value (older pickles store some sizes as floats); else ValueError."""
    if type(value) is int:
        return value
    if type(value) is float and math.isfinite(value) and value.is_integer():
        return int(value)
    shown = repr(value) if type(value) in (float, bool) or value is None else f"a {type(value).__name__}"
    raise ValueError(f"{name} must be an integer, got {shown}")


def _number(value, name: str) -> float:
    """A finite float from an int or float; else ValueError (an int too large for a float is refused, not raised)."""
    if type(value) in (int, float):
        try:
            result = float(value)
        except OverflowError:
            result = math.inf
        if math.isfinite(result):
            return result
    shown = repr(value) if type(value) is float else f"a {type(value).__name__}"
    raise ValueError(f"{name} must be a finite number, got {shown}")


def _nvidia_name_table(config: GeneratorConfig) -> tuple[dict[str, str], list[str]]:
    """(our name -> NVIDIA name, NVIDIA fixed-filter buffers to check)."""
    table = {"mapping.w_avg": "mapping.w_avg"}
    filters = []
    for i in range(config.mapping_layers):
        for p in ("weight", "bias"):
            table[f"mapping.fc{i}.{p}"] = f"mapping.fc{i}.{p}"
    for res in config.block_resolutions:
        b = f"synthesis.b{res}"
        layers = ["conv1"] if res == 4 else ["conv0", "conv1"]
        filters.append(f"{b}.resample_filter")
        if res == 4:
            table[f"{b}.const"] = f"{b}.const"
        for layer in layers:
            for p in ("affine.weight", "affine.bias", "weight", "bias", "noise_strength", "noise_const"):
                table[f"{b}.{layer}.{p}"] = f"{b}.{layer}.{p}"
            filters.append(f"{b}.{layer}.resample_filter")
        for p in ("affine.weight", "affine.bias", "weight", "bias"):
            table[f"{b}.torgb.{p}"] = f"{b}.torgb.{p}"
    return table, filters


def convert_nvidia(G_ema: PersistentRecord, source: str) -> Generator:
    kwargs = G_ema.state.get("_init_kwargs")
    if not isinstance(kwargs, dict):
        raise WeightsError(f"{source}: G_ema has no init_kwargs; is this a stylegan2-ada-pytorch pickle?")
    tensors = _flatten_record(G_ema)
    if any(k.startswith("synthesis.input.") for k in tensors):
        raise WeightsError(f"{source}: this is a StyleGAN3 (alias-free) generator; t2f runs StyleGAN2 generators only")
    config = _nvidia_config(dict(kwargs), source)
    table, filters = _nvidia_name_table(config)
    expected_filter = fir_filter(torch.float32)
    for name in filters:
        if name in tensors and not torch.allclose(tensors[name].float(), expected_filter, atol=1e-6):
            raise WeightsError(f"{source}: {name} is not the [1,3,3,1] filter")
    unused = sorted(set(tensors) - set(table.values()) - set(filters))
    if unused:
        raise WeightsError(f"{source}: unmatched tensors in the pickle: {', '.join(unused[:4])}")
    converted = {ours: tensors[theirs] for ours, theirs in table.items() if theirs in tensors}
    return build_checked(Generator, config, converted, source)


def load_nvidia_pickle(path: str | os.PathLike) -> Generator:
    data = safe_unpickle(path)
    if not isinstance(data, dict) or "G_ema" not in data:
        raise WeightsError(f"{path}: no 'G_ema' in the pickle; expected a stylegan2-ada-pytorch or stylegan3 network pickle")
    G_ema = data["G_ema"]
    if not isinstance(G_ema, PersistentRecord):
        raise WeightsError(f"{path}: 'G_ema' is not a persistent network object")
    return convert_nvidia(G_ema, str(path))


# ----------------------------------------------------------------------------
# rosinality stylegan2-pytorch checkpoints.


def _rosinality_name_table(config: GeneratorConfig) -> tuple[dict[str, tuple[str, tuple[int, ...] | None]], list[str]]:
    """(our name -> (rosinality name, reshape or None), rosinality fixed-filter buffers)."""
    table: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    filters = []
    for i in range(config.mapping_layers):
        for p in ("weight", "bias"):
            table[f"mapping.fc{i}.{p}"] = (f"style.{i + 1}.{p}", None)
    table["mapping.w_avg"] = ("latent_avg", (config.w_dim,))

    def styled_conv(ours: str, theirs: str, noise: str, cin: int, cout: int, res: int):
        table[f"{ours}.weight"] = (f"{theirs}.conv.weight", (cout, cin, 3, 3))
        table[f"{ours}.affine.weight"] = (f"{theirs}.conv.modulation.weight", None)
        table[f"{ours}.affine.bias"] = (f"{theirs}.conv.modulation.bias", None)
        table[f"{ours}.noise_strength"] = (f"{theirs}.noise.weight", ())
        table[f"{ours}.bias"] = (f"{theirs}.activate.bias", None)
        table[f"{ours}.noise_const"] = (noise, (res, res))

    def to_rgb(ours: str, theirs: str, cin: int):
        table[f"{ours}.weight"] = (f"{theirs}.conv.weight", (config.img_channels, cin, 1, 1))
        table[f"{ours}.affine.weight"] = (f"{theirs}.conv.modulation.weight", None)
        table[f"{ours}.affine.bias"] = (f"{theirs}.conv.modulation.bias", None)
        table[f"{ours}.bias"] = (f"{theirs}.bias", (config.img_channels,))

    c4 = config.channels(4)
    table["synthesis.b4.const"] = ("input.input", (c4, 4, 4))
    styled_conv("synthesis.b4.conv1", "conv1", "noises.noise_0", c4, c4, 4)
    to_rgb("synthesis.b4.torgb", "to_rgb1", c4)
    for k, res in enumerate(config.block_resolutions[1:]):
        cin, cout = config.channels(res // 2), config.channels(res)
        styled_conv(f"synthesis.b{res}.conv0", f"convs.{2 * k}", f"noises.noise_{2 * k + 1}", cin, cout, res)
        styled_conv(f"synthesis.b{res}.conv1", f"convs.{2 * k + 1}", f"noises.noise_{2 * k + 2}", cout, cout, res)
        to_rgb(f"synthesis.b{res}.torgb", f"to_rgbs.{k}", cout)
        filters += [f"convs.{2 * k}.conv.blur.kernel", f"to_rgbs.{k}.upsample.kernel"]
    return table, filters


def _rosinality_config(state: dict[str, torch.Tensor], source: str) -> GeneratorConfig:
    try:
        n_mlp = 0
        while f"style.{n_mlp + 1}.weight" in state:
            n_mlp += 1
        style_dim = state["style.1.weight"].shape[0]
        num_convs = sum(1 for k in state if k.startswith("convs.") and k.endswith(".conv.weight"))
        resolution = 2 ** (num_convs // 2 + 2)
        top = state[f"convs.{num_convs - 1}.conv.weight"].shape[1] if num_convs else state["conv1.conv.weight"].shape[1]
        channel_max = max(v.shape[1] for k, v in state.items() if k.endswith(".conv.weight") and v.ndim == 5 and v.shape[-1] == 3)
        img_channels = state["to_rgb1.conv.weight"].shape[1]
    except (KeyError, IndexError, AttributeError) as e:
        raise WeightsError(f"{source}: not a rosinality StyleGAN2 generator state ({e} missing)") from None
    try:
        return GeneratorConfig(resolution=resolution, z_dim=style_dim, w_dim=style_dim, img_channels=img_channels,
                               mapping_layers=n_mlp, channel_base=top * resolution, channel_max=channel_max)
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from None


def convert_rosinality(state: dict[str, torch.Tensor], source: str) -> Generator:
    config = _rosinality_config(state, source)
    table, filters = _rosinality_name_table(config)
    expected_filter = fir_filter(torch.float32) * 4
    for name in filters:
        if name in state and not torch.allclose(state[name].float(), expected_filter, atol=1e-6):
            raise WeightsError(f"{source}: {name} is not the [1,3,3,1] filter")
    used = {theirs for theirs, _ in table.values()}
    unused = sorted(set(state) - used - set(filters))
    if unused:
        raise WeightsError(f"{source}: unmatched tensors in the checkpoint: {', '.join(unused[:4])}")
    converted = {}
    for ours, (theirs, shape) in table.items():
        if theirs not in state:
            continue
        tensor = state[theirs]
        if shape is not None:
            if tensor.numel() != int(np.prod(shape)):
                raise WeightsError(f"{source}: {theirs} has shape {tuple(tensor.shape)}, expected {shape}")
            tensor = tensor.reshape(shape)
        converted[ours] = tensor
    return build_checked(Generator, config, converted, source)


def load_rosinality(path: str | os.PathLike) -> Generator:
    ckpt = safe_load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("g_ema"), dict):
        raise WeightsError(f"{path}: no 'g_ema' state dict; expected a rosinality stylegan2-pytorch checkpoint")
    state = dict(ckpt["g_ema"])
    if "latent_avg" not in ckpt:
        raise WeightsError(f"{path}: no 'latent_avg' in the checkpoint; save it beside g_ema (rosinality's convert_weight.py does)")
    state["latent_avg"] = ckpt["latent_avg"]
    return convert_rosinality(state, str(path))


# ----------------------------------------------------------------------------
# Converted directories and the entry point.


def save_generator(generator: Generator, directory: str | os.PathLike, overwrite: bool = False, **extra) -> Path:
    return save_model_dir(directory, GENERATOR_KIND, generator.config.to_dict(), generator.state_dict(), overwrite=overwrite, **extra)


def load_generator_dir(directory: str | os.PathLike) -> Generator:
    return load_model_dir(directory, GENERATOR_KIND, GeneratorConfig, Generator)[0]


def _is_pickle(path: Path) -> bool:
    with open_regular_file(path) as f:
        head = f.read(2)
        return len(head) == 2 and head[0] == 0x80 and head[1] >= 2 and not zipfile.is_zipfile(f)


def import_generator(source: str | os.PathLike) -> Generator:
    """A generator from a converted directory, an NVIDIA pickle or a rosinality checkpoint (no presets)."""
    try:
        return _import_generator(Path(source))
    except WeightsError:
        raise
    except OSError as e:
        raise WeightsError(f"{source}: cannot read ({e.strerror or e})") from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RuntimeError, ArithmeticError) as e:
        # A file that passed the safe loader but holds something other than a generator of a supported layout.
        raise WeightsError(f"{source}: not a supported StyleGAN2 generator ({first_line(e, typed=True)})") from None


def _import_generator(path: Path) -> Generator:
    if path.is_dir():
        generator = load_generator_dir(path)
    elif is_regular_file(path):
        if path.stat().st_size == 0:
            raise WeightsError(f"{path}: empty file")
        with open_regular_file(path) as f:
            is_zip = zipfile.is_zipfile(f)
        if is_zip or path.suffix in (".pt", ".pth"):
            generator = load_rosinality(path)
        elif _is_pickle(path):
            generator = load_nvidia_pickle(path)
        else:
            raise WeightsError(f"{path}: not a pickle, a torch checkpoint or a t2f directory")
    elif path.exists():
        raise WeightsError(f"{path}: not a regular file or a directory; t2f reads weights from regular files only")
    else:
        raise WeightsError(f"{path}: no such file or directory")
    return generator.eval().requires_grad_(False)
