"""What the built-in buckets share: resize to cover the bucket, then crop (centre or random)."""
from __future__ import annotations

import random
from typing import Optional

from hcp_core.data.geometry import cover_crop
from hcp_core.interfaces import CropPlan, Size


class CoverCropBucket:
    """Crops like the original tool: scale the image to cover the bucket, cut the bucket out.

    With ``crop = "center"`` the plan ignores the rng, so the bucket is deterministic and its
    latents can be cached.
    """

    def __init__(self, crop: str) -> None:
        self.random_crop = crop == "random"
        self.deterministic = not self.random_crop

    def crop(self, size: Size, bucket: Size, rng: Optional[random.Random]) -> CropPlan:
        """Resize ``size`` to cover ``bucket`` and crop it out (offset drawn from ``rng`` if random)."""
        return cover_crop(size, bucket, rng if self.random_crop else None)
