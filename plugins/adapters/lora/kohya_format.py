"""The kohya / webui LoRA layout.

Per layer ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and a scalar ``<name>.alpha``
(scale = alpha / rank), and for a DoRA layer ``<name>.dora_scale`` (the magnitude, shaped
``(out, 1)`` / ``(out, 1, 1, 1)``: one per output channel, LyCORIS's ``wd_on_output`` layout), where ``<name>`` is ``lora_unet_<path with _>`` or
``lora_te_text_model_<path with _>``. Training facts go into ``ss_*`` metadata, as kohya's
sd-scripts write them, so webui's and ComfyUI's info panels show them.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch

from hcp_core.errors import UserError

from .dora import DORA_SCALE
from .naming import kohya_name, kohya_prefix
from .weights import ExportLayer, LoraWeights

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
MAGNITUDE = "." + DORA_SCALE
#: Keys only LyCORIS's other algorithms (LoHa, LoKr) write: such a file is the lycoris adapter's.
LYCORIS_ONLY = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a")


def is_kohya(tensors: Iterable[str]) -> bool:
    """True when the keys are in this layout (plain LoRA or DoRA; a file with LoHa/LoKr layers is not)."""
    keys = list(tensors)
    return any(k.endswith(DOWN) for k in keys) and not any(k.endswith(LYCORIS_ONLY) for k in keys)


def dora_scale_shape(magnitude: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The magnitude (out,) as kohya files store it: ``(out, 1)`` or ``(out, 1, 1, 1)``."""
    return magnitude.reshape(up.shape[0], *[1] * (up.dim() - 1))


def to_kohya(layers: Iterable[ExportLayer], kind: str = "sd") -> Dict[str, torch.Tensor]:
    """The tensors of a kohya file for ``layers``."""
    out: Dict[str, torch.Tensor] = {}
    for layer in layers:
        name = kohya_name(kohya_prefix(layer.target, kind), layer.path)
        out[name + DOWN] = layer.weights.down
        out[name + UP] = layer.weights.up
        out[name + ALPHA] = torch.tensor(float(layer.weights.alpha))
        if layer.weights.magnitude is not None:
            out[name + MAGNITUDE] = dora_scale_shape(layer.weights.magnitude, layer.weights.up)
    return out


def magnitude_axis(source: str, key: str, scale: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> str:
    """"output" for a ``dora_scale`` with one value per output channel (``(out, 1, ...)``), "input"
    for one per input column (``(1, in, ...)``, LyCORIS's ``wd_on_output = false``), as ComfyUI tells them apart."""
    out_ch, in_shape = up.shape[0], tuple(down.shape[1:])
    if scale.shape[0] == out_ch and scale.numel() == out_ch:
        return "output"
    if scale.dim() >= 2 and scale.shape[0] == 1 and tuple(scale.shape[1:]) == (in_shape[0],) + (1,) * (len(in_shape) - 1):
        return "input"
    raise UserError(f"{source}: '{key}' has shape {tuple(scale.shape)}; a DoRA magnitude is one number per output "
                    f"channel ({out_ch}, 1, ...) or per input channel (1, {in_shape[0]}, ...)")


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
        up = tensors[name + UP]
        weights = LoraWeights(down=down, up=up, alpha=alpha_value)
        scale = tensors.get(name + MAGNITUDE)
        if scale is not None:
            weights.axis = magnitude_axis(source, name + MAGNITUDE, scale, down, up)
            weights.magnitude = scale.flatten()
        out[name] = weights
        used.update({key, name + UP, name + ALPHA, name + MAGNITUDE})
    other = sorted(k for k in tensors if k not in used)
    if other:
        shown = ", ".join(repr(k) for k in other[:5])
        raise UserError(
            f"{source}: keys that are not LoRA or DoRA weights ({shown}{', ...' if len(other) > 5 else ''}); "
            "hcp reads LoRA, DoRA, LoHa and LoKr layers (not LyCORIS's Tucker, GLoRA, OFT or DyLoRA ones)"
        )
    return out
