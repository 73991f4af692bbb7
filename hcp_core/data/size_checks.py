"""Warnings about bucket sizes that make training slow for no gain.

Two mistakes cost a run a lot of time without saying so: buckets far above the model's native
resolution (a user trained 512 px buckets on a 64 px test model: every step 64 times the
pixels), and buckets far above the images' own sizes (small images blown up, so the model learns
upscaling blur at the price of large steps). Both are reported once when a run starts and by
``hcp check``; neither stops a run (training above the native size can be intended).
"""
from __future__ import annotations

import statistics
from typing import Any, List, Optional

from ..interfaces import Size

#: Bucket pixels per native-resolution pixel from which a warning is given (2x per side).
NATIVE_AREA_LIMIT = 4.0
#: Median enlargement (per side) of the images into their buckets from which a warning is given.
UPSCALE_LIMIT = 2.0


def native_size(models: Any, latent_factor: int) -> Optional[Size]:
    """The denoiser's trained resolution in pixels, (w, h): its config's ``sample_size`` (latents
    per side; the UNet's or the transformer's) times ``latent_factor``; None when the config has
    no ``sample_size`` (nothing to compare with)."""
    denoiser = getattr(models, "unet", None) or getattr(models, "transformer", None)
    config = getattr(denoiser, "config", None)
    side = config.get("sample_size") if hasattr(config, "get") else getattr(config, "sample_size", None)
    if not side:
        return None
    height, width = (side, side) if isinstance(side, int) else tuple(side)
    return int(width) * latent_factor, int(height) * latent_factor


def enlargement(image: Size, bucket: Size) -> float:
    """How much an image is scaled (per side) to cover its bucket; above 1 means enlarged."""
    return max(bucket[0] / image[0], bucket[1] / image[1])


def size_warnings(prepared: Any, native: Optional[Size] = None) -> List[str]:
    """The warnings for one prepared dataset (a :class:`~hcp_core.data.prepare.PreparedDataset`):
    buckets with at least :data:`NATIVE_AREA_LIMIT` times the pixels of ``native``, and images
    enlarged by a median of :data:`UPSCALE_LIMIT` or more. Empty when all is well."""
    where = f"data.{prepared.name}"
    out: List[str] = []
    used = sorted({prepared.bucket_sizes[b] for b in prepared.assignment}, key=lambda s: s[0] * s[1])
    if native is not None and used:
        largest = used[-1]
        ratio = largest[0] * largest[1] / (native[0] * native[1])
        if ratio >= NATIVE_AREA_LIMIT:
            out.append(
                f"{where}: buckets up to {largest[0]}x{largest[1]} have {ratio:.1f}x the pixels of the model's native "
                f"{native[0]}x{native[1]} (its sample_size times the latent factor): each step costs about that much "
                f"more than at the native size; lower the bucket's target_area / target_size (e.g. target_area = "
                f"{native[0] * native[1]}) unless training above the native resolution is intended"
            )
    if prepared.records:
        scales = [enlargement(r.size, prepared.bucket_sizes[b]) for r, b in zip(prepared.records, prepared.assignment)]
        median = statistics.median(scales)
        if median >= UPSCALE_LIMIT:
            small = statistics.median_low([r.size[0] * r.size[1] for r in prepared.records])
            out.append(
                f"{where}: most images are enlarged to fill their buckets (median {median:.1f}x per side; the median "
                f"image has {small} pixels, the buckets {used[0][0] * used[0][1]} to {used[-1][0] * used[-1][1]}): steps "
                f"are slower and the model learns upscaling blur; lower the bucket's target_area / target_size, or "
                f"use no_upscale = true on a ratio bucket"
            )
    return out
