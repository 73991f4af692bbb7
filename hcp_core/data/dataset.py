"""The torch side of a dataset: one sample per (image, repeat), decoded, cropped, captioned.

A sample is addressed by ``(index, epoch)`` (what :class:`~hcp_core.data.sampler.BucketBatchSampler`
yields); its random choices (crop offset, template, tag order, latent noise) come from a
generator seeded with (seed, dataset, epoch, index), so they do not depend on worker count and
repeat exactly on resume.

Per-sample dict (see :class:`Collate` for the batch):

- ``pixel_values``: float32 [3, H, W] in [-1, 1] (absent when ``latents`` is present)
- ``latents``: float32 [C, H/8, W/8], already scaled by the VAE's scaling factor (latent cache only)
- ``prompt``: str
- ``weight_map``: float32 [1, H/8, W/8] attention-mask loss weights, or None (no mask)
- ``original_size_hw``, ``crop_top_left``, ``target_size_hw``: (int, int), the SDXL conditioning
  order (height/top first); target = the bucket size; for a flipped sample the crop's left edge
  is measured in the mirrored image
- ``flipped``: bool, whether image and mask were mirrored left-right (``flip`` on the dataset)
- ``index``: the sample index actually loaded (differs from the requested one when a bad file
  was replaced), ``image``: its path
"""
from __future__ import annotations

import logging
import random
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..interfaces import CropPlan, ImageRecord, Size
from .images import RGB, BadImage, load_rgb
from .masks import apply_plan, weight_map
from .prepare import DEFAULT_LATENT_FACTOR, PreparedDataset
from .prompts import build_prompt

log = logging.getLogger("hcp.data")

Key = Union[int, Tuple[int, int]]


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """An "RGB" PIL image as float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def sample_rng(seed: int, name: str, epoch: int, index: int) -> random.Random:
    """The generator for one sample's random choices (independent of workers and processes)."""
    return random.Random(f"hcp-sample:{seed}:{name}:{epoch}:{index}")


def flip_drawn(p: float, seed: int, name: str, epoch: int, index: int) -> bool:
    """Whether sample ``index`` of ``epoch`` is mirrored, with probability ``p``.

    Its own generator, not :func:`sample_rng`: switching ``flip`` on leaves every crop, template
    and tag order as it was, and the draw repeats exactly on resume.
    """
    return p > 0 and random.Random(f"hcp-flip:{seed}:{name}:{epoch}:{index}").random() < p


class BucketDataset(torch.utils.data.Dataset):
    """Samples of one prepared dataset; picklable, so DataLoader workers can use it."""

    def __init__(
        self,
        prepared: PreparedDataset,
        *,
        seed: int = 0,
        latent_factor: int = DEFAULT_LATENT_FACTOR,
        background: RGB = (255, 255, 255),
    ) -> None:
        self.name = prepared.name
        self.records: List[ImageRecord] = prepared.records
        self.bucket = prepared.bucket
        self.bucket_sizes: List[Size] = prepared.bucket_sizes
        self.record_bucket: List[int] = prepared.assignment
        self.seed = seed
        self.latent_factor = latent_factor
        self.background = background
        self.flip = float(getattr(prepared.config, "flip", 0.0))
        # Sample i -> record; repeats are consecutive samples of the same record.
        self.sample_record: List[int] = [i for i, r in enumerate(self.records) for _ in range(r.repeat)]
        self.latents: Any = None  # a LatentReader once the latent cache is filled
        self._bad: Set[int] = set()  # records that failed to load in this process

    def __len__(self) -> int:
        return len(self.sample_record)

    def bucket_members(self) -> List[List[int]]:
        """Sample indices per bucket, for the batch sampler."""
        members: List[List[int]] = [[] for _ in self.bucket_sizes]
        for sample, record in enumerate(self.sample_record):
            members[self.record_bucket[record]].append(sample)
        return members

    def use_latents(self, reader: Any) -> None:
        """Serve cached latents instead of pixels (see :mod:`hcp_core.data.latent_cache`)."""
        self.latents = reader

    # ------------------------------------------------------------------ loading
    def plan(self, record_index: int, rng: Optional[random.Random]) -> Tuple[Size, CropPlan]:
        """(bucket size, crop plan) of a record; ``rng`` None gives the deterministic plan."""
        record = self.records[record_index]
        bucket = self.bucket_sizes[self.record_bucket[record_index]]
        return bucket, self.bucket.crop(record.size, bucket, rng)

    def load_pixels(self, record_index: int, plan: CropPlan, flipped: bool = False) -> torch.Tensor:
        """The record's image resized and cropped by ``plan`` (then mirrored left-right if
        ``flipped``), as [3, H, W] in [-1, 1]."""
        record = self.records[record_index]
        im = load_rgb(record.image, self.background, draft=plan.resize)
        pixels = image_to_tensor(apply_plan(im, plan, Image.Resampling.LANCZOS))
        return pixels.flip(-1) if flipped else pixels

    def _weights(self, record: ImageRecord, plan: CropPlan, flipped: bool) -> Optional[torch.Tensor]:
        if record.mask is None:
            return None
        try:
            weights = weight_map(record.mask, record.size, plan, self.latent_factor)
        except (BadImage, OSError) as exc:
            log.warning("data.%s: mask %s cannot be read (%s); weight 1 everywhere for %s", self.name, record.mask, exc, record.image)
            return None
        # Bucket widths are multiples of the latent factor, so mirroring the averaged cells equals
        # averaging the mirrored mask.
        weights = weights[:, ::-1] if flipped else weights
        return torch.from_numpy(np.ascontiguousarray(weights))[None]

    def load(self, index: int, epoch: int) -> Dict[str, Any]:
        """Sample ``index`` as it is in ``epoch``; raises BadImage if its file cannot be used."""
        record_index = self.sample_record[index]
        record = self.records[record_index]
        rng = sample_rng(self.seed, self.name, epoch, index)
        bucket, plan = self.plan(record_index, rng)
        flipped = flip_drawn(self.flip, self.seed, self.name, epoch, index)
        left, top = plan.box[0], plan.box[1]
        if flipped:  # the crop of the mirrored resized image starts where the box ended
            left = plan.resize[0] - plan.box[2]
        sample: Dict[str, Any] = {
            "prompt": build_prompt(record, rng),
            "weight_map": self._weights(record, plan, flipped),
            "original_size_hw": (record.size[1], record.size[0]),
            "crop_top_left": (top, left),
            "target_size_hw": (bucket[1], bucket[0]),
            "flipped": flipped,
            "index": index,
            "image": record.image,
        }
        if self.latents is not None:
            sample["latents"] = self.latents.load(self.latent_key(record_index, plan, flipped),
                                                  f"{self.seed}:{self.name}:{epoch}:{index}")
        else:
            sample["pixel_values"] = self.load_pixels(record_index, plan, flipped)
        return sample

    def latent_key(self, record_index: int, plan: CropPlan, flipped: bool = False) -> str:
        """The cache key of a record's latents under ``plan``, mirrored or not (see
        :mod:`hcp_core.data.latent_cache`)."""
        from .latent_cache import entry_key

        record = self.records[record_index]
        bucket = self.bucket_sizes[self.record_bucket[record_index]]
        return entry_key(record.image, bucket, plan, self.background, flipped=flipped)

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        index, epoch = (key, 0) if isinstance(key, int) else key
        sample = self._try_load(index, epoch)
        if sample is not None:
            return sample
        # One bad file must not end the run: use another image of the same bucket instead.
        for candidate in self._same_bucket_after(index):
            sample = self._try_load(candidate, epoch)
            if sample is not None:
                return sample
        raise DataError(
            f"data.{self.name}: every image in bucket {self.record_bucket[self.sample_record[index]]} failed to load; "
            f"run `hcp check` to list the bad files"
        )

    def _try_load(self, index: int, epoch: int) -> Optional[Dict[str, Any]]:
        record_index = self.sample_record[index]
        if record_index in self._bad:
            return None
        try:
            return self.load(index, epoch)
        except (BadImage, OSError) as exc:
            self._bad.add(record_index)
            log.warning(
                "data.%s: skipping %s (%s); a same-bucket image takes its place",
                self.name, self.records[record_index].image, exc,
            )
            return None

    def _same_bucket_after(self, index: int) -> List[int]:
        """The other samples of ``index``'s bucket, starting after it and wrapping around."""
        bucket = self.record_bucket[self.sample_record[index]]
        same = [i for i, r in enumerate(self.sample_record) if self.record_bucket[r] == bucket]
        start = same.index(index)
        return same[start + 1 :] + same[:start]


class Collate:
    """Stacks same-bucket samples into a batch dict; picklable for DataLoader workers.

    Batch keys: ``pixel_values`` [B, 3, H, W] or ``latents`` [B, C, h, w]; ``prompts`` list[str];
    ``weight_map`` [B, 1, h, w] or None (when no sample has a mask; samples without a mask get
    ones when others have one); ``original_size_hw``, ``crop_top_left``, ``target_size_hw``
    LongTensor [B, 2]; ``indices`` LongTensor [B]; ``flipped`` BoolTensor [B]; ``images`` list[str];
    ``dataset`` (name) and ``loss_weight`` (float) of the dataset.
    """

    def __init__(self, name: str, loss_weight: float = 1.0) -> None:
        self.name = name
        self.loss_weight = loss_weight

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        batch: Dict[str, Any] = {
            "dataset": self.name,
            "loss_weight": self.loss_weight,
            "prompts": [s["prompt"] for s in samples],
            "images": [s["image"] for s in samples],
            "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "flipped": torch.tensor([bool(s.get("flipped", False)) for s in samples], dtype=torch.bool),
        }
        for key in ("original_size_hw", "crop_top_left", "target_size_hw"):
            batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
        for key in ("pixel_values", "latents"):
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        maps = [s["weight_map"] for s in samples]
        present = next((m for m in maps if m is not None), None)
        batch["weight_map"] = (
            None if present is None else torch.stack([m if m is not None else torch.ones_like(present) for m in maps])
        )
        return batch
