"""Config classes of the built-in buckets (light: imported at registration).

Limits (docs/data.md, "Bucket limits"): sides and steps are multiples of 8 up to MAX_SIDE
(8192), the target area at most MAX_AREA (8192 * 8192 = 67,108,864 px), max_ratio between 1
and MAX_RATIO (20), num_buckets between 1 and MAX_BUCKETS (256). Within them every bucket's
``fit`` takes well under a second; tests/test_data_buckets.py times the extremes.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import attrs

from hcp_core.config.validators import fail, in_range, one_of
from hcp_core.config.values import MAX_AREA, MAX_SIDE, SIZE_MULTIPLE

CROP_MODES = ("center", "random")
BUILD_FROM = ("ratios", "images")
#: The VAE downsamples by 8, so every bucket side must be a multiple of 8.
LATENT_MULTIPLE = SIZE_MULTIPLE
DEFAULT_AREA = 512 * 512
#: Longest side / shortest side; 20:1 is already a thin strip.
MAX_RATIO = 20.0
#: More buckets than this only splits a data set into batches too rare to fill.
MAX_BUCKETS = 256


def _side(inst: Any, attribute: attrs.Attribute, value: Optional[Tuple[int, int]]) -> None:
    if value is None:
        return
    if any(v < LATENT_MULTIPLE or v % LATENT_MULTIPLE or v > MAX_SIDE for v in value):
        fail(attribute, f"each side must be a multiple of {LATENT_MULTIPLE} between {LATENT_MULTIPLE} and {MAX_SIDE}, "
                        f"got {list(value)}")


def _step(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < LATENT_MULTIPLE or value % LATENT_MULTIPLE or value > MAX_SIDE:
        fail(attribute, f"must be a multiple of {LATENT_MULTIPLE} between {LATENT_MULTIPLE} and {MAX_SIDE}, got {value!r}")


def _bound(inst: Any, attribute: attrs.Attribute, value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE):
        fail(attribute, f"must be a whole number of pixels between 1 and {MAX_SIDE}, got {value!r}")


@attrs.define
class FixedBucketConfig:
    """Every image resized to cover target_size = [w, h], then cropped to it (crop = "center" | "random")."""

    target_size: Tuple[int, int] = attrs.field(default=(512, 512), validator=_side)
    crop: str = attrs.field(default="center", validator=one_of(CROP_MODES))


@attrs.define
class RatioBucketConfig:
    """Aspect-ratio buckets near one area: from = "ratios" (spread over the ratio range) or "images" (clustered).

    Give target_area (pixels) or target_size = [w, h] (area w*h); default 512*512. Sides are
    multiples of step; max_ratio bounds long side / short side; crop = "center" | "random";
    min_side / max_side bound every side; no_upscale = true gives small images smaller buckets.
    """

    # ``from`` is a Python keyword: the TOML key is "from", the attribute build_from.
    build_from: str = attrs.field(default="ratios", validator=one_of(BUILD_FROM), metadata={"key": "from"})
    target_area: Optional[int] = attrs.field(default=None, validator=in_range(1, MAX_AREA))
    target_size: Optional[Tuple[int, int]] = attrs.field(default=None, validator=_side)
    step: int = attrs.field(default=64, validator=_step)
    num_buckets: int = attrs.field(default=5, validator=in_range(1, MAX_BUCKETS))
    max_ratio: float = attrs.field(default=2.0, validator=in_range(1, MAX_RATIO))
    crop: str = attrs.field(default="center", validator=one_of(CROP_MODES))
    #: Never enlarge an image: one smaller than its bucket gets that bucket scaled down to fit it.
    no_upscale: bool = False
    #: Bounds on both sides of every bucket (kohya's min_bucket_reso / max_bucket_reso).
    min_side: Optional[int] = attrs.field(default=None, validator=_bound)
    max_side: Optional[int] = attrs.field(default=None, validator=_bound)

    def __attrs_post_init__(self) -> None:
        if self.target_area is not None and self.target_size is not None:
            raise ValueError("give target_area or target_size, not both")
        if self.min_side is not None and self.max_side is not None and self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is larger than max_side {self.max_side}")
        if self.area < self.step * self.step:
            raise ValueError(f"target area {self.area} is smaller than one step x step square ({self.step}x{self.step})")

    @property
    def area(self) -> int:
        """The target area in pixels."""
        if self.target_size is not None:
            return int(self.target_size[0]) * int(self.target_size[1])
        return int(self.target_area) if self.target_area is not None else DEFAULT_AREA
