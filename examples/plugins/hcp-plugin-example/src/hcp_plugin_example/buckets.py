"""The ``multiple_of`` bucket: aspect ratio kept, sides rounded to a multiple (no torch needed)."""
from __future__ import annotations

import math
import random
from typing import List, Optional, Sequence

from hcp_core.interfaces import BucketContext, CropPlan, Size

from .plugin import MultipleOfConfig


class MultipleOfBucket:
    """Implements :class:`hcp_core.interfaces.Bucket`; built by ``factory(config, *, context)``."""

    def __init__(self, config: MultipleOfConfig, *, context: BucketContext) -> None:
        self.config = config
        self.context = context
        # A centred crop never looks at the rng, so hcp may cache latents.
        self.deterministic = config.crop == "center"

    def target(self, size: Size) -> Size:
        """The bucket size for an image of ``size``: integer maths, so no float rounding surprises."""
        w, h = size
        longest = max(w, h)
        step, side = self.config.multiple, self.config.max_side
        return (
            max(step, w * side // longest // step * step),
            max(step, h * side // longest // step * step),
        )

    def fit(self, sizes: Sequence[Size]) -> List[Size]:
        """One bucket per distinct target size, sorted by (width, height)."""
        return sorted({self.target(s) for s in sizes})

    def assign(self, size: Size, buckets: Sequence[Size]) -> int:
        """The bucket equal to the image's target; for an image not seen by :meth:`fit`, the bucket
        with the closest aspect ratio (then the closest area)."""
        if not buckets:
            raise ValueError("multiple_of: no buckets to assign to; call fit() with the data set's sizes first")
        want = self.target(size)
        if want in buckets:
            return list(buckets).index(want)
        ratio = math.log(want[0] / want[1])
        return min(
            range(len(buckets)),
            key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), abs(buckets[i][0] * buckets[i][1] - want[0] * want[1])),
        )

    def crop(self, size: Size, bucket: Size, rng: Optional[random.Random]) -> CropPlan:
        """Scale the image to cover ``bucket``, then crop it: centred, or at a random offset when
        ``crop = "random"`` and an ``rng`` is given."""
        (w, h), (bw, bh) = size, bucket
        scale = max(bw / w, bh / h)
        # max() guards against round() landing one pixel short of the bucket.
        rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
        if not self.deterministic and rng is not None:
            left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
        else:
            left, top = (rw - bw) // 2, (rh - bh) // 2
        return CropPlan(resize=(rw, rh), box=(left, top, left + bw, top + bh))
