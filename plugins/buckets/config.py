"""Config classes of the built-in buckets (light: imported at registration)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import attrs

CROP_MODES = ("center", "random")
BUILD_FROM = ("ratios", "images")
#: The VAE downsamples by 8, so every bucket side must be a multiple of 8.
LATENT_MULTIPLE = 8
DEFAULT_AREA = 512 * 512


def _one_of(options: Tuple[str, ...]):
    def check(inst: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(repr(o) for o in options)}, got {value!r}", attribute)

    return check


def _side(inst: Any, attribute: attrs.Attribute, value: Optional[Tuple[int, int]]) -> None:
    if value is None:
        return
    if any(v < LATENT_MULTIPLE or v % LATENT_MULTIPLE for v in value):
        raise ValueError(f"each side must be a positive multiple of {LATENT_MULTIPLE}, got {list(value)}", attribute)


def _step(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < LATENT_MULTIPLE or value % LATENT_MULTIPLE:
        raise ValueError(f"must be a multiple of {LATENT_MULTIPLE} and at least {LATENT_MULTIPLE}, got {value!r}", attribute)


def _positive(inst: Any, attribute: attrs.Attribute, value: Optional[float]) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be positive, got {value!r}", attribute)


def _at_least_one(inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 1:
        raise ValueError(f"must be at least 1, got {value!r}", attribute)


@attrs.define
class FixedBucketConfig:
    """Every image resized to cover target_size = [w, h], then cropped to it (crop = "center" | "random")."""

    target_size: Tuple[int, int] = attrs.field(default=(512, 512), validator=_side)
    crop: str = attrs.field(default="center", validator=_one_of(CROP_MODES))


@attrs.define
class RatioBucketConfig:
    """Aspect-ratio buckets near one area: from = "ratios" (spread over the ratio range) or "images" (clustered).

    Give target_area (pixels) or target_size = [w, h] (area w*h); default 512*512. Sides are
    multiples of step; max_ratio bounds long side / short side; crop = "center" | "random".
    """

    # ``from`` is a Python keyword: the TOML key is "from", the attribute build_from.
    build_from: str = attrs.field(default="ratios", validator=_one_of(BUILD_FROM), metadata={"key": "from"})
    target_area: Optional[int] = attrs.field(default=None, validator=_positive)
    target_size: Optional[Tuple[int, int]] = attrs.field(default=None, validator=_side)
    step: int = attrs.field(default=64, validator=_step)
    num_buckets: int = attrs.field(default=5, validator=_at_least_one)
    max_ratio: float = attrs.field(default=2.0, validator=_at_least_one)
    crop: str = attrs.field(default="center", validator=_one_of(CROP_MODES))

    def __attrs_post_init__(self) -> None:
        if self.target_area is not None and self.target_size is not None:
            raise ValueError("give target_area or target_size, not both")
        if self.area < self.step * self.step:
            raise ValueError(f"target area {self.area} is smaller than one step x step square ({self.step}x{self.step})")

    @property
    def area(self) -> int:
        """The target area in pixels."""
        if self.target_size is not None:
            return int(self.target_size[0]) * int(self.target_size[1])
        return int(self.target_area) if self.target_area is not None else DEFAULT_AREA
