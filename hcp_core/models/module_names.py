"""Module paths of CLIP text encoders as files spell them, whatever transformers calls them.

transformers 5 flattened ``CLIPTextModel`` (``encoder.layers.0...``) where transformers 4, webui,
kohya and diffusers' converters say ``text_model.encoder.layers.0...``. Files hcp writes (merged
models, LoRA files) always use the ``text_model.`` spelling (the *canonical* path); reading
accepts both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

TEXT_MODEL_PREFIX = "text_model."
UNET = "unet"


def is_flat_clip(model: "nn.Module") -> bool:
    """A CLIP text model without the ``text_model`` level (transformers 5)."""
    return (
        type(model).__name__.startswith("CLIPTextModel")
        and not hasattr(model, "text_model")
        and hasattr(model, "encoder")
    )


def canonical_path(target: str, model: "nn.Module", path: str) -> str:
    """The file spelling of module ``path`` of ``model`` (adds ``text_model.`` where it is flat)."""
    if target != UNET and is_flat_clip(model):
        return TEXT_MODEL_PREFIX + path
    return path


def native_path(target: str, model: "nn.Module", path: str) -> str:
    """The inverse of :func:`canonical_path`: the name ``model.named_modules()`` uses."""
    if target != UNET and is_flat_clip(model) and path.startswith(TEXT_MODEL_PREFIX):
        return path[len(TEXT_MODEL_PREFIX):]
    return path


def canonical_state_dict(target: str, model: "nn.Module") -> Dict[str, Any]:
    """``model.state_dict()`` under canonical names (``text_model.*`` for any CLIP text encoder)."""
    return {canonical_path(target, model, k): v for k, v in model.state_dict().items()}
