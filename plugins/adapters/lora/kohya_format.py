"""The kohya / webui LoRA layout.

Per layer ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and a scalar ``<name>.alpha``
(scale = alpha / rank), where ``<name>`` is ``lora_unet_<path with _>`` or
``lora_te_text_model_<path with _>``. Training facts go into ``ss_*`` metadata, as kohya's
sd-scripts write them, so webui's and ComfyUI's info panels show them.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch

from hcp_core.errors import UserError

from .naming import kohya_name, kohya_prefix
from .weights import ExportLayer, LoraWeights

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"


def is_kohya(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys are in this layout."""
    return any(k.endswith(DOWN) for k in tensors)


def to_kohya(layers: Iterable[ExportLayer], kind: str = "sd") -> Dict[str, torch.Tensor]:
    """The tensors of a kohya file for ``layers``."""
    out: Dict[str, torch.Tensor] = {}
    for layer in layers:
        name = kohya_name(kohya_prefix(layer.target, kind), layer.path)
        out[name + DOWN] = layer.weights.down
        out[name + UP] = layer.weights.up
        out[name + ALPHA] = torch.tensor(float(layer.weights.alpha))
    return out


def from_kohya(tensors: Mapping[str, torch.Tensor], *, source: str) -> Dict[str, LoraWeights]:
    """kohya module name -> weights. A missing ``.alpha`` means alpha = rank (scale 1), as in kohya."""
    out: Dict[str, LoraWeights] = {}
    used = set()
    for key, down in tensors.items():
        if not key.endswith(DOWN):
            continue
        name = key[: -len(DOWN)]
        if name + UP not in tensors:
            raise UserError(f"{source}: '{key}' has no matching '{name + UP}'")
        alpha = tensors.get(name + ALPHA)
        rank = down.shape[0]
        alpha_value = float(alpha) if alpha is not None else float(rank)
        out[name] = LoraWeights(down=down, up=tensors[name + UP], alpha=alpha_value)
        used.update({key, name + UP, name + ALPHA})
    other = sorted(k for k in tensors if k not in used)
    if other:
        shown = ", ".join(repr(k) for k in other[:5])
        raise UserError(
            f"{source}: keys that are not plain LoRA weights ({shown}{', ...' if len(other) > 5 else ''}); "
            "LoCon/LoHa/DoRA variants are not supported"
        )
    return out
