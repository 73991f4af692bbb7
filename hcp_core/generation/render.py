"""Render one image with diffusers' ``StableDiffusionPipeline`` and hcp's prompt encoding.

``hcp generate`` and the samples of a training run both call :func:`render_image`, so an image
depends only on the weights and :class:`~hcp_core.generation.params.GenerationParams`, not on
which of the two made it. Prompts are encoded by hcp's :class:`PromptEncoder` (long prompts in
chunks, CLIP skip, custom words, exactly as in training) and handed to the pipeline as
``prompt_embeds`` / ``negative_prompt_embeds``; the denoising loop is diffusers'.

Noise comes from a CPU ``torch.Generator`` seeded with the image's seed, so the starting latents
are the same on every device.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Sequence, Tuple

import torch

from ..errors import UserError
from ..interfaces import ModelBundle
from ..models.text_encoding import PromptEncoder
from .params import MAX_SEED, GenerationParams
from .schedulers import make_scheduler


def check_renderable(models: ModelBundle, where: str = "generation") -> None:
    """Raise :class:`UserError` for models this module cannot render (SDXL so far)."""
    if getattr(models, "kind", "sd") != "sd":
        raise UserError(f"{where}: rendering {models.kind} models is not supported yet; hcp renders SD 1.x/2.x models")


def build_pipeline(models: ModelBundle, scheduler_name: str) -> Any:
    """A ``StableDiffusionPipeline`` around ``models``' modules (not copied, not moved) with a
    fresh ``scheduler_name`` sampler on the model's noise schedule. No safety checker runs."""
    from diffusers import StableDiffusionPipeline

    check_renderable(models)
    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=make_scheduler(scheduler_name, models.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_prompt_pair(encoder: PromptEncoder, prompt: str, negative_prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)`` hidden states ``[1, chunks * 77, D]``.

    Both are tokenized in one call so they share a chunk count (the UNet needs equal lengths for
    classifier-free guidance); an empty negative prompt is encoded as the empty string, as webui does.
    """
    hidden = encoder.encode(encoder.tokenize([prompt, negative_prompt]))
    return hidden[0:1], hidden[1:2]


def render_image(
    models: ModelBundle,
    encoder: PromptEncoder,
    params: GenerationParams,
    *,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Any:
    """The PIL image ``params`` describe, rendered with ``models`` as they are now.

    ``models`` keeps whatever is attached to it (LoRA branches, custom words); the caller puts
    the modules in eval mode. ``autocast`` wraps the work (training passes accelerate's, so
    half-precision frozen weights and fp32 trained ones mix as during training).
    """
    if not 0 <= params.seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and 2**64 - 1, got {params.seed}")
    pipe = build_pipeline(models, params.scheduler)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    with torch.no_grad(), autocast():
        positive, negative = encode_prompt_pair(encoder, params.prompt, params.negative_prompt)
        result = pipe(
            prompt_embeds=positive, negative_prompt_embeds=negative,
            num_inference_steps=params.steps, guidance_scale=params.cfg,
            width=params.width, height=params.height, generator=generator, output_type="pil",
        )  # fmt: skip
    return result.images[0]


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
