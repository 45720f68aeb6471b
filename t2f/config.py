"""Model configs: StyleGAN2's `GeneratorConfig`, and the checks every frozen config dataclass shares.

A config is validated when it is made, so that a `config.json` (whatever it holds) either
describes a model small enough to build on the meta device in bounded time or is refused with
one ValueError line naming the field. `MapperConfig` (t2f/mapper.py) uses the same checks.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import UsageError


# ----------------------------------------------------------------------------
# StyleGAN2's generator.


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    resolution: int = 1024               # Output resolution, a power of two from 4 up.
    z_dim: int = 512                     # Latent z dimension.
    w_dim: int = 512                     # Intermediate latent w dimension.
    img_channels: int = 3                # Output image channels.
    mapping_layers: int = 8              # Fully connected layers in the mapping network.
    mapping_lr_multiplier: float = 0.01  # Equalized-lr multiplier of the mapping layers.
    channel_base: int = 32768            # Channels at resolution r are min(channel_base // r, channel_max).
    channel_max: int = 512               # Upper bound on channels per layer.
    num_fp16_res: int = 0                # Highest resolutions run in fp16 at Precision.FP16; 0 = none.
    conv_clamp: float | None = None      # Clamp activations to +-conv_clamp; None = no clamping.

    def __post_init__(self):
        res = self.resolution
        if type(res) is not int or res < 4 or res > 8192 or res & (res - 1):
            raise UsageError(f"resolution must be a power of two from 4 to 8192, got {shown(res)}")
        check_sizes(self, dict(z_dim=8192, w_dim=8192, img_channels=16, mapping_layers=64, channel_base=1 << 24,
                               channel_max=8192))
        if self.channel_base < res:
            raise UsageError(f"channel_base {self.channel_base} leaves no channels at resolution {res}")
        if type(self.num_fp16_res) is not int or not 0 <= self.num_fp16_res <= 64:
            raise UsageError(f"num_fp16_res must be an integer from 0 to 64, got {shown(self.num_fp16_res)}")
        if self.conv_clamp is not None and not (type(self.conv_clamp) in (int, float) and self.conv_clamp > 0
                                                and math.isfinite(self.conv_clamp)):
            raise UsageError(f"conv_clamp must be a positive number or null, got {shown(self.conv_clamp)}")
        if not (type(self.mapping_lr_multiplier) in (int, float) and self.mapping_lr_multiplier > 0
                and math.isfinite(self.mapping_lr_multiplier)):
            raise UsageError(f"mapping_lr_multiplier must be positive, got {shown(self.mapping_lr_multiplier)}")

    @property
    def block_resolutions(self) -> list[int]:
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    def channels(self, resolution: int) -> int:
        return min(self.channel_base // resolution, self.channel_max)

    @property
    def fp16_resolution(self) -> int:
        """Lowest resolution whose block runs in fp16 (above the output resolution if none)."""
        return max(2 ** (int(math.log2(self.resolution)) + 1 - self.num_fp16_res), 8)

    @property
    def num_ws(self) -> int:
        """Number of w vectors the synthesis network consumes: 2 per resolution, minus 2."""
        return 2 * len(self.block_resolutions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GeneratorConfig":
        return config_from_dict(cls, data)


# ----------------------------------------------------------------------------
# Checks every config shares.


def shown(value) -> str:
    """A config value for an error message, short whatever the file held (a huge integer, a long string, a nested list)."""
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if type(value) in (int, float, bool) or value is None:
        return repr(value)
    if type(value) is str and len(value) <= 40:
        return repr(value)
    return f"a {type(value).__name__}"


def check_sizes(config, limits: dict[str, int]) -> None:
    """Each named field of `config` must be an int (not a bool) from 1 to its limit; ValueError naming the first that is not.

    The limits keep a config's model small enough to build on the meta device in bounded time
    whatever a config file says; the weights file must then match it tensor for tensor (io.build_checked).
    """
    for name, limit in limits.items():
        value = getattr(config, name)
        if type(value) is not int or not 0 < value <= limit:
            raise UsageError(f"{name} must be an integer from 1 to {limit}, got {shown(value)}")


def config_from_dict(cls, data: dict):
    """Build a frozen config dataclass, refusing unknown or missing keys by name."""
    if not isinstance(data, dict):
        raise UsageError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"{cls.__name__}: unknown keys {[name[:40] for name in unknown[:8]]}")
    return cls(**data)


class FieldError(UsageError):
    """A value of a run-time config (t2f.sources.ModelSources, the engine's PipelineConfig) that is not valid.

    `field` names it, so that a command reports it as a usage error on its own option.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
