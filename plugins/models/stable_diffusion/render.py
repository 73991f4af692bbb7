"""Render one image with a diffusers pipeline and hcp's prompt encoding, for SD 1.x/2.x and SDXL.

``hcp generate`` and the samples of a training run both call :func:`render_image`, so an image
depends only on the weights and :class:`~hcp_core.generation.params.GenerationParams`, not on
which of the two made it. Prompts are encoded by hcp's prompt encoder (long prompts in chunks,
CLIP skip, custom words, exactly as in training) and handed to the pipeline as embeddings; the
denoising loop is diffusers':

* SD (``models.kind == "sd"``): ``StableDiffusionPipeline`` with ``prompt_embeds`` /
  ``negative_prompt_embeds`` from a :class:`~hcp_core.models.text_encoding.PromptEncoder`.
* SDXL (``"sdxl"``): ``StableDiffusionXLPipeline`` with the joined hidden states of both text
  encoders and the pooled embedding of the second, from an
  :class:`~.conditioning.SdxlPromptEncoder`; the size conditioning says the image was
  neither resized nor cropped (original size = target size = the image's, crop at (0, 0)).

Noise comes from a CPU ``torch.Generator`` seeded with the image's seed, so the starting latents
are the same on every device.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict

import torch

from hcp_core.errors import UserError
from hcp_core.generation.params import MAX_SEED, GenerationParams
from hcp_core.generation.render import vae_decode_without_autocast
from hcp_core.generation.schedulers import make_scheduler
from hcp_core.interfaces import ModelBundle
from hcp_core.models.pipelines import pipeline_class
from hcp_core.models.text_encoding import EncodedPrompts

from .loading import PIPELINE_CLASSES


def model_kind(models: ModelBundle) -> str:
    """``models.kind`` ("sd" or "sdxl"); a :class:`UserError` for a kind hcp cannot render."""
    kind = getattr(models, "kind", "sd")
    if kind not in PIPELINE_CLASSES:
        raise UserError(f"cannot render a {kind!r} model: hcp renders {', '.join(PIPELINE_CLASSES)} models")
    return kind


def build_diffusers_pipeline(models: ModelBundle, scheduler_name: str) -> Any:
    """The diffusers pipeline of ``models.kind`` around ``models``' modules (not copied, not
    moved) with a fresh ``scheduler_name`` sampler on the model's noise schedule.

    No safety checker (SD) and no invisible watermark (SDXL) touch the image.
    """
    kind = model_kind(models)
    scheduler = make_scheduler(scheduler_name, models.scheduler.config)
    parts = dict(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
                 scheduler=scheduler)  # fmt: skip
    if kind == "sdxl":
        # force_zeros_for_empty_prompt (zeros for a missing negative prompt) never acts: hcp
        # always hands the pipeline negative embeddings, an empty prompt's being the encoded "".
        extra = dict(text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2, add_watermarker=False)
    else:
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(PIPELINE_CLASSES[kind])(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_conditioning(encoder: Any, prompt: str, negative_prompt: str) -> Dict[str, torch.Tensor]:
    """The pipeline's text keyword arguments for one image (each tensor has batch size 1).

    ``encoder`` is the model's prompt encoder: a ``PromptEncoder`` (hidden states: SD's
    ``prompt_embeds`` / ``negative_prompt_embeds``) or an ``SdxlPromptEncoder`` (hidden states and
    pooled embeddings: SDXL's four ``*prompt_embeds``). Both prompts are tokenized in one call so
    they share a chunk count (the UNet needs equal lengths for classifier-free guidance); an empty
    negative prompt is encoded as the empty string, as webui does (diffusers' SDXL pipeline uses
    zeros when it is given no negative prompt at all, see ``force_zeros_for_empty_prompt``).
    """
    encoded = encoder([prompt, negative_prompt])
    if isinstance(encoded, EncodedPrompts):
        return {
            "prompt_embeds": encoded.hidden[0:1], "negative_prompt_embeds": encoded.hidden[1:2],
            "pooled_prompt_embeds": encoded.pooled[0:1], "negative_pooled_prompt_embeds": encoded.pooled[1:2],
        }  # fmt: skip
    return {"prompt_embeds": encoded[0:1], "negative_prompt_embeds": encoded[1:2]}


def size_conditioning(models: ModelBundle, params: GenerationParams) -> Dict[str, Any]:
    """SDXL's size/crop conditioning for a whole, uncropped ``height`` x ``width`` image; nothing for SD."""
    if model_kind(models) != "sdxl":
        return {}
    size = (params.height, params.width)
    return {"original_size": size, "target_size": size, "crops_coords_top_left": (0, 0)}


def render_image(
    models: ModelBundle,
    encoder: Any,
    params: GenerationParams,
    *,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Any:
    """The PIL image ``params`` describe, rendered with ``models`` as they are now.

    ``encoder`` is the prompt encoder of ``models``' kind (``make_prompt_encoder(models)`` or a
    wrapper of it). ``models`` keeps whatever is attached to it (LoRA branches, custom words); the
    caller puts the modules in eval mode. ``autocast`` wraps the work (training passes
    accelerate's, so half-precision frozen weights and fp32 trained ones mix as during training);
    on SDXL the VAE decodes outside it, in its own precision.
    """
    if not 0 <= params.seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and 2**64 - 1, got {params.seed}")
    pipe = build_diffusers_pipeline(models, params.scheduler)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    sdxl = model_kind(models) == "sdxl"
    decoding = vae_decode_without_autocast(models.vae) if sdxl else contextlib.nullcontext()
    with torch.no_grad(), autocast(), decoding:
        text = prompt_conditioning(encoder, params.prompt, params.negative_prompt)
        if sdxl != ("pooled_prompt_embeds" in text):
            raise ValueError(f"a {type(encoder).__name__} cannot condition a {models.kind} model: "
                             "use hcp_plugins.models.stable_diffusion.conditioning.make_prompt_encoder(models)")  # fmt: skip
        result = pipe(
            **text, **size_conditioning(models, params),
            num_inference_steps=params.steps, guidance_scale=params.cfg,
            width=params.width, height=params.height, generator=generator, output_type="pil",
        )  # fmt: skip
    return result.images[0]
