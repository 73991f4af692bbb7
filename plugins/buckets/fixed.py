"""``fixed``: one bucket of ``target_size``; every image is resized to cover it and cropped."""
from __future__ import annotations

from typing import List, Sequence

from hcp_core.interfaces import BucketContext, Size

from .base import CoverCropBucket
from .config import FixedBucketConfig


class FixedBucket(CoverCropBucket):
    """A single bucket: the configured ``target_size``."""

    def __init__(self, config: FixedBucketConfig, *, context: BucketContext) -> None:
        super().__init__(config.crop)
        self.size: Size = (int(config.target_size[0]), int(config.target_size[1]))

    def fit(self, sizes: Sequence[Size]) -> List[Size]:
        """Always ``[target_size]``, whatever the images are."""
        return [self.size]

    def assign(self, size: Size, buckets: Sequence[Size]) -> int:
        """Every image goes to the one bucket."""
        return 0
