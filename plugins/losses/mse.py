"""MSE loss; returns one value per sample so the trainer can weight samples (min-SNR)."""
from __future__ import annotations

from typing import Any

import torch

from hcp_core.interfaces import LossInputs


class MseLoss:
    """Squared error per element, times the attention-mask weight when the batch has one
    (``inputs.weight_map``, broadcast over channels), averaged per sample; computed in float32."""

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
        loss = (pred.float() - target.float()) ** 2
        if inputs.weight_map is not None:
            weight = inputs.weight_map.to(loss.dtype)
            if weight.shape[-2:] != loss.shape[-2:]:
                raise ValueError(
                    f"attention-mask weight map is {tuple(weight.shape[-2:])} but the latents are "
                    f"{tuple(loss.shape[-2:])}; masks must be reduced to latent resolution"
                )
            loss = loss * weight
        return loss.flatten(1).mean(dim=1)


#: ``masked_mse`` is ``mse`` (which applies the weight map itself); kept for old configs.
MaskedMseLoss = MseLoss
