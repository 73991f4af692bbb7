"""A small synthetic captioned image set: one coloured shape on a plain background per image.

Layout written by :func:`build_demo_dataset`::

    out_dir/000.png  out_dir/000.txt   # caption: "red circle, blue background"
    out_dir/001.png  out_dir/001.txt
    out_dir/002.jpg  out_dir/002.txt   # every third image is a JPEG
    ...
    out_dir/att_mask/000.png           # grayscale attention masks for the even-numbered images

Images come in mixed aspect ratios (see :data:`SIZES`) so buckets have something to sort. A mask
is 128 (50% = normal weight) on the background and 255 (100% = 5x weight) on the shape.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Tuple

import attrs
from PIL import Image, ImageDraw

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
#: (width, height) in pixels; wide, tall, square and very wide.
SIZES: Tuple[Tuple[int, int], ...] = ((96, 64), (64, 96), (80, 80), (128, 64))

MASK_BACKGROUND = 128  # 50% brightness: weight 1
MASK_SHAPE = 255  # 100% brightness: weight 5
MASK_DIR = "att_mask"


@attrs.frozen
class SampleSpec:
    """What one demo image shows; everything else follows from it."""

    shape: str
    colour: str
    background: str
    size: Tuple[int, int]  # (w, h)
    centre: Tuple[float, float]  # as fractions of (w, h)
    scale: float  # shape radius as a fraction of the shorter side

    @property
    def caption(self) -> str:
        return f"{self.colour} {self.shape}, {self.background} background"


def sample_specs(n: int, seed: int = 0) -> List[SampleSpec]:
    """``n`` varied sample descriptions, the same for the same ``seed``."""
    rng = random.Random(seed)
    names = list(COLOURS)
    specs = []
    for i in range(n):
        colour, background = rng.sample(names, 2)  # never the same colour twice
        specs.append(
            SampleSpec(
                shape=SHAPES[i % len(SHAPES)],
                colour=colour,
                background=background,
                size=SIZES[i % len(SIZES)],
                centre=(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)),
                scale=rng.uniform(0.25, 0.4),
            )
        )
    return specs


def render(spec: SampleSpec) -> Tuple[Image.Image, Image.Image]:
    """Draw ``spec``: an RGB image and its grayscale ("L") attention mask."""
    w, h = spec.size
    image = Image.new("RGB", (w, h), COLOURS[spec.background])
    mask = Image.new("L", (w, h), MASK_BACKGROUND)
    cx, cy = spec.centre[0] * w, spec.centre[1] * h
    r = spec.scale * min(w, h)
    box = (cx - r, cy - r, cx + r, cy + r)
    for canvas, fill in ((ImageDraw.Draw(image), COLOURS[spec.colour]), (ImageDraw.Draw(mask), MASK_SHAPE)):
        if spec.shape == "circle":
            canvas.ellipse(box, fill=fill)
        elif spec.shape == "square":
            canvas.rectangle(box, fill=fill)
        else:  # triangle, apex up
            canvas.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image, mask


def render_sample(index: int, size: Tuple[int, int], seed: int = 0) -> Tuple[Image.Image, Image.Image, str]:
    """Sample ``index`` of the seed's sequence drawn at ``size``: (image, mask, caption)."""
    spec = attrs.evolve(sample_specs(index + 1, seed)[index], size=size)
    image, mask = render(spec)
    return image, mask, spec.caption


def build_demo_dataset(out_dir: str | Path, *, n_images: int = 12, seed: int = 0) -> Path:
    """Write ``n_images`` captioned images (and masks for the even-numbered ones); return ``out_dir``.

    The same ``seed`` writes the same files.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    out = Path(out_dir)
    masks = out / MASK_DIR
    masks.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(sample_specs(n_images, seed)):
        image, mask = render(spec)
        stem = f"{i:03d}"
        if i % 3 == 2:
            image.save(out / f"{stem}.jpg", quality=95)
        else:
            image.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(spec.caption, encoding="utf-8")
        if i % 2 == 0:
            mask.save(masks / f"{stem}.png")
    return out
