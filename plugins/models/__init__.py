"""Built-in model families: Stable Diffusion 1.x/2.x (``sd``), SDXL (``sdxl``), SD3 / 3.5 (``sd3``) and
FLUX.1 (``flux``).

A family is chosen by ``model.family`` or detected from the model folder's ``model_index.json``
(its ``_class_name``); ``detect`` lists the pipeline classes each family reads, and
``"single_file"`` marks the family that reads a lone checkpoint file.
"""
from __future__ import annotations

import attrs

from hcp_core.hookspecs import hookimpl

from .config import FluxConfig, SD3Config


@attrs.define
class StableDiffusionConfig:
    """Stable Diffusion 1.x/2.x or SDXL: a UNet, CLIP text encoder(s), the DDPM objective
    (epsilon or v-prediction, see [train] noise_offset and min_snr_gamma). No options of its own."""


@hookimpl
def hcp_register_models(registry) -> None:
    factory = "hcp_plugins.models.stable_diffusion:build_family"
    registry.add("sd", config=StableDiffusionConfig, factory=factory,
                 detect=("StableDiffusionPipeline", "single_file"),
                 doc="Stable Diffusion 1.x/2.x: UNet, one CLIP text encoder, DDPM (epsilon or v-prediction)")
    registry.add("sdxl", config=StableDiffusionConfig, factory=factory, detect=("StableDiffusionXLPipeline",),
                 doc="SDXL: UNet with pooled text and size/crop conditioning, two CLIP text encoders, DDPM")
    registry.add("flux", config=FluxConfig, factory="hcp_plugins.models.flux:build_family", detect=("FluxPipeline",),
                 doc="FLUX.1 (dev or schnell): flow-matching transformer, CLIP-L pooled + T5 text, 16-channel VAE")
    registry.add("sd3", config=SD3Config, factory="hcp_plugins.models.sd3:build_family",
                 detect=("StableDiffusion3Pipeline",),
                 doc="SD3 / 3.5: MMDiT flow-matching transformer, CLIP-L + CLIP-G + T5 text, 16-channel VAE")
