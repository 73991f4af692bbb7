"""Key prefixes of LyCORIS files: kohya's for SD/SDXL, OneTrainer's for diffusion transformers.

SD/SDXL parts use kohya's LoRA prefixes (``lora_unet``, ``lora_te``, ``lora_te1``/``lora_te2``),
which LyCORIS writes too. kohya's own layout for FLUX/SD3 transformers uses the original model's
fused module names, which diffusers' separate q/k/v projections cannot be written in as LoHa or
LoKr; these files use OneTrainer's names instead, which ComfyUI maps for FLUX and SD3:
``lora_transformer_<diffusers module path with _>``, and ``lora_te1`` / ``lora_te2`` /
``lora_te3`` for the first, second and third text encoder (ComfyUI: CLIP-L, then CLIP-G or T5).
"""
from __future__ import annotations

from ..lora.naming import TRANSFORMER, UNET, kohya_prefix

SD_KINDS = ("sd", "sdxl")


def lycoris_prefix(target: str, kind: str = "sd") -> str:
    """The key prefix of model part ``target`` of a ``kind`` model (a ``ValueError`` for an unknown part)."""
    if target == TRANSFORMER:
        return "lora_transformer"
    if kind in SD_KINDS or target == UNET:
        return kohya_prefix(target, kind)
    if target.startswith("text_encoder"):
        index = target[len("text_encoder"):].lstrip("_") or "1"
        if index.isdigit():
            return f"lora_te{index}"
    raise ValueError(f"no LyCORIS key prefix for model part {target!r}")
