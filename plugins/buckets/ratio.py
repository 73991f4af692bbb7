"""``ratio``: aspect-ratio buckets (ARB) of about one area, chosen from a ratio range or the images.

Candidate sizes: for every width that is a multiple of ``step``, the height (also a multiple of
``step``) whose area is nearest the target, within ``max_ratio``; and the same with width and
height swapped. The n buckets are then the candidates nearest, in log aspect ratio, to n target
ratios (each candidate used once):

- ``from = "ratios"``: targets spread evenly over [1 / max_ratio, max_ratio] in log space;
- ``from = "images"``: targets are the centres of an exact 1-D k-means of the images' log
  aspect ratios (clipped to the range), so buckets follow the data.

``min_side`` / ``max_side`` drop the candidates with a side outside them. With ``no_upscale`` an
image that would have to be enlarged to cover its bucket gets that bucket scaled down by the
enlargement, sides rounded down to ``step`` (:func:`shrink_to_image`): an extra, smaller bucket
of about the same shape that the image covers without enlarging.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence, Tuple

from hcp_core.data.geometry import RatioIndex, log_ratio
from hcp_core.interfaces import BucketContext, Size

from .base import CoverCropBucket
from .clustering import kmeans_1d, match_ordered, spread
from .config import RatioBucketConfig

log = logging.getLogger("hcp.data")


def _nearest_multiple(value: float, step: int, area: float, other: int) -> int:
    """The multiple of ``step`` (at least ``step``) for one side that brings ``side * other`` nearest ``area``."""
    low = max(step, math.floor(value / step) * step)
    high = max(step, math.ceil(value / step) * step)
    return min((low, high), key=lambda s: (abs(s * other - area), -s))


def shrink_to_image(image: Size, bucket: Size, step: int) -> Size:
    """``bucket`` if ``image`` covers it; else ``bucket`` scaled by min(iw / bw, ih / bh) (so the
    image covers it unscaled), each side rounded down to a multiple of ``step`` (at least ``step``).

    Integer arithmetic: a side that is exactly a multiple of ``step`` is never rounded one step short.
    """
    (iw, ih), (bw, bh) = image, bucket
    if iw >= bw and ih >= bh:
        return bucket
    # bw * min(iw / bw, ih / bh) = min(iw, bw * ih / bh); likewise for the height.
    w = min(iw // step, (bw * ih) // (bh * step)) * step
    h = min((bh * iw) // (bw * step), ih // step) * step
    return max(step, w), max(step, h)


def candidate_sizes(area: int, step: int, max_ratio: float, min_side: Optional[int] = None,
                    max_side: Optional[int] = None) -> List[Size]:
    """Every bucket size this config can produce, ascending by aspect ratio (w / h); only those
    with both sides within [min_side, max_side] when given."""
    limit = math.log(max_ratio) + 1e-9
    shortest = math.sqrt(area / max_ratio)
    longest = math.sqrt(area * max_ratio)
    sizes = set()
    w = max(step, math.floor(shortest / step) * step)
    while w <= math.ceil(longest / step) * step:
        h = _nearest_multiple(area / w, step, area, w)
        if abs(math.log(w / h)) <= limit:
            sizes.add((w, h))
            sizes.add((h, w))
        w += step
    # One size per aspect ratio: the one whose area is nearest the target.
    by_ratio: dict = {}
    low, high = min_side or 0, max_side or math.inf
    for s in sorted(sizes, key=lambda s: (abs(s[0] * s[1] - area), s)):
        if low <= min(s) and max(s) <= high:
            by_ratio.setdefault(_ratio_key(s), s)
    return sorted(by_ratio.values(), key=lambda s: (log_ratio(s), s))


def _ratio_key(size: Size) -> tuple:
    g = math.gcd(size[0], size[1])
    return (size[0] // g, size[1] // g)


class RatioBucket(CoverCropBucket):
    """Aspect-ratio bucketing; see the module docstring for how sizes are chosen."""

    def __init__(self, config: RatioBucketConfig, *, context: BucketContext) -> None:
        super().__init__(config.crop)
        self.config = config
        self.dataset = context.dataset
        #: Remarks from the last :meth:`fit` (shown under the bucket table).
        self.notes: List[str] = []
        self._index: Optional[Tuple[Tuple[Size, ...], RatioIndex]] = None
        #: The ratio buckets of the last :meth:`fit`, before no_upscale added smaller ones.
        self.base: Optional[List[Size]] = None

    def fit(self, sizes: Sequence[Size]) -> List[Size]:
        """The bucket sizes (w, h): the ratio buckets ascending by aspect ratio, then (no_upscale)
        the smaller buckets of images that would be enlarged, ascending by ratio and area.

        When the step allows fewer distinct sizes than ``num_buckets`` (or the images have fewer
        distinct ratios), it uses what there is and says so in :attr:`notes` and the log.
        """
        self.notes = []
        self.base = self._ratio_buckets(sizes)
        if not self.config.no_upscale:
            return list(self.base)
        lookup = RatioIndex(self.base)
        extra = {shrink_to_image(s, self.base[lookup(s)], self.config.step) for s in sizes} - set(self.base)
        return list(self.base) + sorted(extra, key=lambda s: (log_ratio(s), s))

    def _ratio_buckets(self, sizes: Sequence[Size]) -> List[Size]:
        cfg = self.config
        half_range = math.log(cfg.max_ratio)
        if cfg.build_from == "images":
            if not sizes:
                raise ValueError("from = 'images' needs at least one image")
            clipped = [min(half_range, max(-half_range, log_ratio(s))) for s in sizes]
            targets = kmeans_1d(clipped, cfg.num_buckets)
            if len(targets) < cfg.num_buckets:
                self._note(f"the images have only {len(targets)} distinct aspect ratio(s), so {len(targets)} bucket(s)")
        else:
            targets = spread(cfg.num_buckets, half_range)
        candidates = candidate_sizes(cfg.area, cfg.step, cfg.max_ratio, cfg.min_side, cfg.max_side)
        if not candidates:
            raise ValueError(
                f"no bucket of area about {cfg.area} with sides multiple of {cfg.step} fits min_side = "
                f"{cfg.min_side} / max_side = {cfg.max_side} within max_ratio {cfg.max_ratio}; widen the "
                f"side bounds or change target_area"
            )
        if len(targets) > len(candidates):
            self._note(
                f"num_buckets = {cfg.num_buckets}, but area {cfg.area} with step {cfg.step} and max_ratio "
                f"{cfg.max_ratio} allows only {len(candidates)} distinct size(s); using those "
                f"(lower step or raise max_ratio for more)"
            )
            return candidates
        chosen = match_ordered(targets, [log_ratio(c) for c in candidates])
        return [candidates[j] for j in chosen]

    def _note(self, text: str) -> None:
        self.notes.append(text)
        log.warning("%s: %s", f"data.{self.dataset}.bucket" if self.dataset else "bucket", text)

    def assign(self, size: Size, buckets: Sequence[Size]) -> int:
        """The bucket of nearest log aspect ratio (ties: the lower index); with no_upscale, among
        the ratio buckets, then its shrunk size if the image does not cover it."""
        key = tuple(buckets)
        if self._index is None or self._index[0] != key:
            self._index = (key, _Lookup(key, self.base if self.config.no_upscale else None))  # once per bucket list
        lookup = self._index[1]
        nearest = lookup.base[lookup.nearest(size)]
        if self.config.no_upscale:  # its smaller bucket, when the list has it
            return lookup.position.get(shrink_to_image(size, nearest, self.config.step), lookup.position[nearest])
        return lookup.position[nearest]


class _Lookup:
    """Nearest-ratio lookup over the ratio buckets of a bucket list, and each size's index in it."""

    def __init__(self, buckets: Tuple[Size, ...], base: Optional[List[Size]]) -> None:
        self.position = {tuple(b): i for i, b in reversed(list(enumerate(buckets)))}
        # The ratio buckets of the last fit, when this list holds them (it does when fit made it).
        self.base = [tuple(b) for b in base] if base and all(tuple(b) in self.position for b in base) else list(buckets)
        self._ratio = RatioIndex(self.base)

    def nearest(self, size: Size) -> int:
        """The index in ``base`` of the bucket of nearest log aspect ratio."""
        return self._ratio(size)
