"""The Stable Diffusion families: SD 1.x/2.x (``sd``) and SDXL (``sdxl``).

A UNet denoiser with CLIP text encoders (SDXL: two, plus pooled embeddings and size/crop time
ids), a VAE with 4 latent channels, and the DDPM objective: per-sample noise and timesteps, the
epsilon or v-prediction target, optional noise offset and min-SNR weighting. The family's own
code lives beside this class: :mod:`.loading` (diffusers folders and single files),
:mod:`.conditioning` (the UNet's text conditioning; SDXL's pooled embeddings and time ids),
:mod:`.ddpm` (targets, SNR, min-SNR weights), :mod:`.render` (images through diffusers' pipelines)
and :mod:`.single_file` (the original LDM/SGM single-file layout). What every family shares (CLIP
chunking in :mod:`hcp_core.models.text_encoding`, per-sample noise in :mod:`hcp_core.train.diffusion`)
is hcp's core; this class ties it all into one family behind the ``hcp_register_models`` hook.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, List, Mapping, Optional

import torch

from hcp_core.interfaces import ModelBundle, TrainingPrediction


class StableDiffusionFamily:
    """SD 1.x/2.x and SDXL (the loader tells them apart by the folder's or file's parts)."""

    #: Model parts adapters may target.
    parts = ("unet", "text_encoder", "text_encoder_2")
    #: ``hcp generate --embeddings`` works (custom words in the CLIP encoders).
    custom_words = True
    #: ``model.cache_text`` may encode every prompt once: the prompt encoders offer
    #: ``chunk_count``, so cached rows pad to a batch's chunk count as live encoding does.
    text_cache = True

    def __init__(self, config: Any = None) -> None:
        self.config = config

    # ------------------------------------------------------------------ loading
    def load(self, pretrained: str, *, config: Optional[str] = None, prediction_type: Optional[str] = None) -> ModelBundle:
        """The model at ``pretrained`` (diffusers folder or single file), frozen, in fp32."""
        from .loading import load_models

        return load_models(pretrained, prediction_type=prediction_type, config=config)

    def load_skeleton(self, pretrained: str, *, config: Optional[str] = None,
                      prediction_type: Optional[str] = None) -> Optional[ModelBundle]:
        """The model's modules on the ``meta`` device (no weights read); None for a lone single file."""
        from .loading import load_model_skeleton

        return load_model_skeleton(pretrained, prediction_type=prediction_type, config=config)

    def latent_factor(self, models: ModelBundle) -> int:
        """Pixels per latent side: 2 ** (VAE down blocks - 1), 8 for SD."""
        return 2 ** (len(models.vae.config.block_out_channels) - 1)

    def vae_safe_in_bf16(self, models: ModelBundle) -> bool:
        """SD 1.x/2.x's VAE encodes well in bf16; SDXL's overflows in half precision and stays fp32
        under ``model.vae_dtype = "auto"``."""
        return models.kind == "sd"

    def vae_upcast_in_fp16(self, models: ModelBundle) -> bool:
        """SDXL's VAE overflows in fp16: fp16 generation keeps it in fp32 when its config says
        ``force_upcast`` (fixed fp16 VAEs say false)."""
        return models.kind == "sdxl" and bool(getattr(models.vae.config, "force_upcast", False))

    def default_layers(self, part: str) -> List[str]:
        """What a LoRA group on ``part`` targets without ``layers``: the UNet's transformer blocks
        (kohya's default) and the CLIP encoders' attention and MLP layers (see :mod:`.default_layers`)."""
        from ..default_layers import STABLE_DIFFUSION, patterns_for

        return patterns_for(STABLE_DIFFUSION, part)

    # ------------------------------------------------------------------ prompts
    def prompt_encoder(self, models: ModelBundle, *, clip_skip: int = 0) -> Any:
        """CLIP prompt encoding with webui-style 75-token chunks and clip skip (SDXL: both encoders)."""
        from .conditioning import make_prompt_encoder

        return make_prompt_encoder(models, clip_skip=clip_skip)

    def clip_skip_problem(self, models: ModelBundle, clip_skip: int) -> Optional[str]:
        """Why ``clip_skip`` is out of range for ``models`` (their CLIP layers less one; SDXL less
        one more, it already conditions on the penultimate layer), or None."""
        from .conditioning import max_clip_skip

        limit = max_clip_skip(models)
        if clip_skip <= limit:
            return None
        if models.kind == "sdxl":
            return f"this SDXL model allows 0 to {limit} (it already uses the penultimate layer)"
        return f"this model allows 0 to {limit}"

    # ------------------------------------------------------------------ the objective
    def training_prediction(
        self,
        models: ModelBundle,
        encoder: Any,
        batch: Mapping[str, Any],
        latents: torch.Tensor,
        sample_ids: List[int],
        *,
        seed: int,
        step: int,
        train: Any,
        autocast: Callable[[], ContextManager],
        train_text: bool,
    ) -> TrainingPrediction:
        """DDPM: noise and a timestep per sample, the UNet's prediction and its epsilon/v target.

        With an encoder that carries a :class:`~hcp_core.train.diffusion.TrainingGuidance`
        (DreamArtist), the prediction is the guided one of the prompts and their negative prompts."""
        from hcp_core.train.diffusion import draw_noise_and_timesteps

        from .conditioning import unet_conditioning
        from .ddpm import min_snr_weights, snr, training_target

        scheduler = models.scheduler
        noise, t = draw_noise_and_timesteps(
            latents, sample_ids, seed=seed, step=step,
            num_train_timesteps=scheduler.config.num_train_timesteps, noise_offset=train.noise_offset,
        )
        noisy = scheduler.add_noise(latents, noise, t)
        guidance = getattr(encoder, "guidance", None)  # DreamArtist: a negative branch, guided (diffusion.py)
        with torch.set_grad_enabled(train_text), autocast():
            cond = unet_conditioning(encoder, batch, noisy.device)  # SDXL adds pooled + time ids
            negative = unet_conditioning(encoder, guidance.negative_batch(batch), noisy.device) if guidance else None
        with autocast():
            pred = models.unet(noisy, t, **cond).sample
            if negative is not None:
                pred = guidance.combine(models.unet(noisy, t, **negative).sample, pred, t,
                                        scheduler.config.num_train_timesteps)
        target = training_target(scheduler, latents, noise, t, models.prediction_type)
        snr_values = snr(scheduler, t)
        weights = min_snr_weights(snr_values, train.min_snr_gamma, models.prediction_type)
        return TrainingPrediction(pred=pred, target=target, timesteps=t, snr=snr_values, weights=weights)

    # ------------------------------------------------------------------ images
    def sampling_pipeline(self, models: ModelBundle, sampler: str) -> Any:
        """diffusers' SD or SDXL pipeline around ``models`` with the ``sampler`` hcp names (for
        batches of plain prompts: ``hcp tools gen-from-prompts``)."""
        from .render import build_diffusers_pipeline

        return build_diffusers_pipeline(models, sampler)

    def render(self, models: ModelBundle, encoder: Any, params: Any, *,
               autocast: Callable[[], ContextManager]) -> Any:
        """One PIL image for generation parameters ``params`` with the models as they are now."""
        from .render import render_image

        return render_image(models, encoder, params, autocast=autocast)

    # ------------------------------------------------------------------ single files
    def single_file_problem(self, models: ModelBundle) -> Optional[str]:
        """Why ``models`` cannot be written as one original-layout file (SD 2.x), or None."""
        from .single_file import single_file_problem

        return single_file_problem(models)

    def write_single_file(self, models: ModelBundle, path: Path, dtype: torch.dtype) -> Path:
        """``models`` as one original-layout (LDM / SGM) ``.safetensors`` at ``path`` in ``dtype``,
        the file webui and ComfyUI load (``hcp tools merge-lora --single-file``)."""
        from .single_file import write_single_file

        return write_single_file(models, path, dtype)


def build_family(config: Any) -> StableDiffusionFamily:
    """Factory of the ``sd`` and ``sdxl`` components."""
    return StableDiffusionFamily(config)

