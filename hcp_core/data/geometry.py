"""Bucket geometry shared by bucket plugins: aspect ratios, resize-to-cover and crop plans.

Pure Python (no torch, no PIL) so buckets stay cheap to build and to pickle.
"""
from __future__ import annotations

import bisect
import math
import random
from typing import List, Optional, Sequence

from ..interfaces import CropPlan, Size

CROP_MODES = ("center", "random")


def log_ratio(size: Size) -> float:
    """log(w / h): 0 for squares, symmetric for portrait and landscape."""
    return math.log(size[0] / size[1])


def cover_crop(size: Size, bucket: Size, rng: Optional[random.Random]) -> CropPlan:
    """Scale ``size`` to the smallest size that covers ``bucket``, then crop ``bucket`` out of it.

    ``rng`` None crops the centre; otherwise the crop's offset is drawn from ``rng``.
    """
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    # max() guards against rounding a covering side down to one pixel short.
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if rng is None:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    return CropPlan(resize=(rw, rh), box=(left, top, left + bw, top + bh))


def nearest_ratio(size: Size, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose log aspect ratio is nearest ``size``'s (ties: the lower index)."""
    target = log_ratio(size)
    best, best_err = 0, math.inf
    for i, b in enumerate(buckets):
        err = abs(log_ratio(b) - target)
        if err < best_err - 1e-12:
            best, best_err = i, err
    return best


class RatioIndex:
    """Nearest-log-ratio lookup over many buckets in O(log n) per image (for large data sets)."""

    def __init__(self, buckets: Sequence[Size]) -> None:
        order = sorted(range(len(buckets)), key=lambda i: (log_ratio(buckets[i]), i))
        self._ratios = [log_ratio(buckets[i]) for i in order]
        self._order = order

    def __call__(self, size: Size) -> int:
        target = log_ratio(size)
        pos = bisect.bisect_left(self._ratios, target)
        candidates = [p for p in (pos - 1, pos) if 0 <= p < len(self._ratios)]
        best = min(candidates, key=lambda p: (abs(self._ratios[p] - target), self._order[p]))
        return self._order[best]


def aspect_error(size: Size, bucket: Size) -> float:
    """Relative aspect-ratio mismatch |r_image / r_bucket - 1| (0.1 = 10%)."""
    return abs(math.exp(log_ratio(size) - log_ratio(bucket)) - 1.0)


def check_bucket_sizes(sizes: Sequence[Size], multiple: int, where: str) -> List[Size]:
    """``sizes`` as a list of (w, h) int tuples; ValueError naming ``where`` if one is unusable."""
    out: List[Size] = []
    for s in sizes:
        w, h = int(s[0]), int(s[1])
        if w <= 0 or h <= 0 or w % multiple or h % multiple:
            raise ValueError(f"{where}: bucket size {w}x{h} must have positive sides that are multiples of {multiple}")
        out.append((w, h))
    return out
