"""``ratio``: aspect-ratio buckets (ARB) of about one area, chosen from a ratio range or the images.

Candidate sizes: for every width that is a multiple of ``step``, the height (also a multiple of
``step``) whose area is nearest the target, within ``max_ratio``; and the same with width and
height swapped. The n buckets are then the candidates nearest, in log aspect ratio, to n target
ratios (each candidate used once):

- ``from = "ratios"``: targets spread evenly over [1 / max_ratio, max_ratio] in log space;
- ``from = "images"``: targets are the centres of an exact 1-D k-means of the images' log
  aspect ratios (clipped to the range), so buckets follow the data.
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


def candidate_sizes(area: int, step: int, max_ratio: float) -> List[Size]:
    """Every bucket size this config can produce, ascending by aspect ratio (w / h)."""
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
    for s in sorted(sizes, key=lambda s: (abs(s[0] * s[1] - area), s)):
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

    def fit(self, sizes: Sequence[Size]) -> List[Size]:
        """The bucket sizes (w, h), ascending by aspect ratio.

        When the step allows fewer distinct sizes than ``num_buckets`` (or the images have fewer
        distinct ratios), it uses what there is and says so in :attr:`notes` and the log.
        """
        cfg = self.config
        self.notes = []
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
        candidates = candidate_sizes(cfg.area, cfg.step, cfg.max_ratio)
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
        """The bucket of nearest log aspect ratio (ties: the lower index)."""
        key = tuple(buckets)
        if self._index is None or self._index[0] != key:
            self._index = (key, RatioIndex(key))  # a sorted lookup, built once per bucket list
        return self._index[1](size)
