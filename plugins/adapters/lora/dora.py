"""DoRA (weight-decomposed LoRA, Liu et al. 2024): ``W' = m * (W + dW) / ||W + dW||``.

``dW`` is the layer's LoRA update (``scale * up @ down``), ``||.||`` the L2 norm of each output
channel (a row of a Linear weight; an output filter of a convolution), as in the DoRA paper and
PEFT, and LyCORIS's ``wd_on_output = True`` (its default). ``m`` (one number per output channel)
is trained and starts as ``||W||``, so a fresh branch changes nothing.

The branch adds ``(s - 1) * W x + s * dW x`` to the host's output ``W x + b``, with
``s = m / ||W + dW||``; the norm is treated as a constant for the backward pass, as PEFT does
(section 4.3 of the paper: same forward, much less memory).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoraBranch

#: kohya / LyCORIS key of the magnitude; PEFT (diffusers) calls it ``lora_magnitude_vector``.
DORA_SCALE = "dora_scale"


def channel_norm(weight: torch.Tensor, axis: str = "output") -> torch.Tensor:
    """L2 norm of each output channel (``axis="output"``) or input column (``"input"``), float32, flat."""
    w = weight.float()
    if axis == "input":
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1).norm(dim=1)


def _along(values: torch.Tensor, weight: torch.Tensor, axis: str) -> torch.Tensor:
    """``values`` (one per channel on ``axis``) shaped to broadcast over ``weight``."""
    shape = [1] * weight.dim()
    shape[0 if axis == "output" else 1] = -1
    return values.reshape(shape)


def dora_merged_delta(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str = "output") -> torch.Tensor:
    """``m * (W + dW) / ||W + dW|| - W`` (float32): what merging a DoRA layer adds to ``base``."""
    merged = base.float() + delta.float()
    scale = magnitude.float().flatten() / channel_norm(merged, axis)
    return merged * _along(scale, merged, axis) - base.float()


class DoraBranch(LoraBranch):
    """A LoRA branch with DoRA's trained magnitude (see the module docstring)."""

    needs_host = True

    def __init__(self, host: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *, cap: bool = True,
                 magnitude: Optional[torch.Tensor] = None) -> None:  # fmt: skip
        super().__init__(host, rank, alpha, dropout, cap=cap)
        start = channel_norm(host.weight.detach()) if magnitude is None else magnitude.detach().float().flatten()
        self.magnitude = nn.Parameter(start.to(host.weight.device).clone())

    def forward(self, x: torch.Tensor, host: nn.Module, output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.down.weight.dtype)
        dropped = self.dropout(x)
        lora = self.up(self.down(dropped)) * self.scale
        norm = channel_norm(host.weight.detach().float() + self.delta_weight()).detach()
        scale = self.magnitude / norm
        if isinstance(self.dropout, nn.Identity):
            base = output if host.bias is None else output - _channels(host.bias, output, host)
        elif isinstance(host, nn.Conv2d):
            base = host._conv_forward(dropped, host.weight.to(dropped.dtype), None)
        else:
            base = F.linear(dropped, host.weight.to(dropped.dtype))
        scale = _channels(scale, output, host)
        return (scale - 1) * base.to(lora.dtype) + scale * lora

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """LoRA's factors plus the magnitude (``dora_scale``)."""
        return {**super().state_tensors(), DORA_SCALE: self.magnitude}


def _channels(values: torch.Tensor, output: torch.Tensor, host: nn.Module) -> torch.Tensor:
    """Per-output-channel ``values`` shaped to broadcast over the host's ``output``."""
    if isinstance(host, nn.Conv2d):
        return values.reshape(-1, 1, 1)
    return values
