"""Attention masks: mask brightness -> loss weight, aligned with the image and reduced to latents.

A mask is a grayscale image with the image's file stem. Brightness b in [0, 1] maps to a loss
weight piecewise-linearly through :data:`BRIGHTNESS_POINTS` -> :data:`WEIGHT_POINTS` (the table
of the original guide: 0% -> 0, 25% -> 0.5, 50% -> 1, 75% -> 3, 100% -> 5). The mask gets exactly
the image's resize and crop, then weights are averaged over each latent cell.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

from PIL import Image

from ..interfaces import CropPlan, Size
from .images import load_gray

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

BRIGHTNESS_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
WEIGHT_POINTS = (0.0, 0.5, 1.0, 3.0, 5.0)
#: Pillow's advice: a gap of 3 is indistinguishable from a full-quality resize.
REDUCING_GAP = 3.0


def brightness_to_weight(brightness: Union[float, "np.ndarray"]) -> Union[float, "np.ndarray"]:
    """Loss weight for brightness in [0, 1] (values outside are clamped); exact at the table's points."""
    import numpy as np

    out = np.interp(brightness, BRIGHTNESS_POINTS, WEIGHT_POINTS)
    return float(out) if np.ndim(out) == 0 else out.astype(np.float32)


def apply_plan(im: Image.Image, plan: CropPlan, resample: int) -> Image.Image:
    """Resize ``im`` to ``plan.resize`` and crop ``plan.box``, as one resampling of the kept region.

    Resampling only the source region that survives the crop gives the same pixels as resizing
    everything and cropping afterwards, without resizing what is thrown away. Large reductions
    first shrink by a whole factor (``reducing_gap``), which is much faster and looks the same.
    """
    rw, rh = plan.resize
    left, top, right, bottom = plan.box
    sx, sy = im.width / rw, im.height / rh
    source = (left * sx, top * sy, right * sx, bottom * sy)
    return im.resize((right - left, bottom - top), resample, box=source, reducing_gap=REDUCING_GAP)


def weight_map(mask_path: str, image_size: Size, plan: CropPlan, latent_factor: int = 8) -> "np.ndarray":
    """Loss weights at latent resolution, float32 [h / latent_factor, w / latent_factor].

    The mask is stretched to ``image_size`` (the image as displayed) if its size differs, given
    the image's ``plan``, mapped to weights, then averaged over latent_factor x latent_factor cells.
    Raises :class:`~hcp_core.data.images.BadImage` when the mask cannot be decoded.
    """
    import numpy as np

    gray = load_gray(mask_path)
    weights = brightness_to_weight(np.asarray(gray, dtype=np.float32) / 255.0)
    im = Image.fromarray(np.asarray(weights, dtype=np.float32), "F")
    if im.size != tuple(image_size):
        im = im.resize(tuple(image_size), Image.Resampling.BILINEAR)
    cropped = np.asarray(apply_plan(im, plan, Image.Resampling.BILINEAR), dtype=np.float32)
    h, w = cropped.shape
    if h % latent_factor or w % latent_factor:
        raise ValueError(f"bucket size {w}x{h} is not a multiple of the latent factor {latent_factor}")
    cells = cropped.reshape(h // latent_factor, latent_factor, w // latent_factor, latent_factor)
    return cells.mean(axis=(1, 3), dtype=np.float32)
