"""What rendering shares across families: the VAE decoding in its own precision, image grids,
and :func:`render_image`, which renders with the family a model's ``kind`` names.

Each family renders its own way (its ``render``: SD/SDXL through diffusers' pipelines with hcp's
prompt encoding, in the ``sd`` family plugin; FLUX and SD3 in theirs).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch

from ..interfaces import ModelBundle
from .params import GenerationParams


def render_image(
    models: ModelBundle,
    encoder: Any,
    params: GenerationParams,
    *,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Any:
    """The PIL image ``params`` describe, rendered with ``models`` as they are now by the model
    family registered under ``models.kind`` (its ``render``; see
    :class:`~hcp_core.interfaces.ModelFamily`). ``encoder`` is that family's prompt encoder.
    """
    from ..models.family import family_of

    return family_of(models).render(models, encoder, params, autocast=autocast)


@contextlib.contextmanager
def vae_decode_without_autocast(vae: Any) -> Iterator[None]:
    """Inside, ``vae.decode`` runs in the VAE's own precision, even under an autocast context.

    SDXL's VAE overflows in fp16, so training keeps it in fp32 (``model.vae_fp32``) and so does
    fp16 generation (see ``generate.vae_stays_fp32``); under the run's fp16 autocast its
    convolutions would run in fp16 all the same. The latents are cast to the VAE's dtype (the
    pipeline hands them over in the text embeddings' dtype, fp16 in an fp16 run).
    """
    decode = vae.decode

    def decode_in_own_precision(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_in_own_precision  # an instance attribute: the module's class is untouched
    try:
        yield
    finally:
        del vae.decode


def make_grid(images: Sequence[Any], columns: int | None = None) -> Any:
    """The PIL ``images`` pasted left to right, top to bottom (about square by default).

    Cells are as large as the largest image; smaller ones sit in their cell's top-left corner.
    """
    from PIL import Image

    if not images:
        raise ValueError("no images for a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "black")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * cell_w, (i // columns) * cell_h))
    return grid
