"""Fold LoRA files into a model's weights: ``W += weight * scale * up @ down`` per layer.

Used to apply a LoRA at generation time (no extra cost per step) and by ``hcp tools merge-lora``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from .lora_file import match_layers, read_lora_file

TARGETS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def bundle_parts(models: Any) -> Dict[str, nn.Module]:
    """The LoRA-capable parts of a ModelBundle (or pipeline, or mapping) that are present."""
    if isinstance(models, Mapping):
        return {t: m for t, m in models.items() if m is not None}
    return {t: getattr(models, t) for t in TARGETS if getattr(models, t, None) is not None}


def bundle_kind(models: Any, parts: Mapping[str, nn.Module]) -> str:
    """The model family kind ("sd", "sdxl", "flux", ...) of a bundle, or guessed from a mapping's parts."""
    return getattr(models, "kind", None) or ("sdxl" if "text_encoder_2" in parts and "transformer" not in parts else "sd")


def merge_layers(parts: Mapping[str, nn.Module], layers: Mapping[Tuple[str, str], Any], weight: float = 1.0) -> None:
    """Add ``weight`` times each layer's update to its host weight (computed in float32).

    A layer's weights give the update by ``delta_for(host_weight)`` (LoRA, DoRA, LoHa, LoKr): at
    ``weight`` w a DoRA layer becomes ``W + w * (W' - W)``, as webui and ComfyUI apply strength.
    """
    with torch.no_grad():
        for (target, path), lora in layers.items():
            host = parts[target].get_submodule(path)
            delta = lora.delta_for(host.weight).to(host.weight.device)
            host.weight.copy_((host.weight.float() + weight * delta).to(host.weight.dtype))


def apply_lora_file(models: Any, path: str | os.PathLike, weight: float = 1.0, kind: str | None = None) -> int:
    """Merge the LoRA file at ``path`` into ``models`` with ``weight``; return the number of layers.

    ``models`` is a ModelBundle, a diffusers pipeline or a mapping of part name to module;
    ``kind`` ("sd" | "sdxl" | "flux" | "sd3"; it picks kohya names) defaults to the bundle's.
    """
    parts = bundle_parts(models)
    layers = match_layers(read_lora_file(path), parts, kind or bundle_kind(models, parts))
    merge_layers(parts, layers, weight)
    return len(layers)
