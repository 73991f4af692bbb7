"""The DDPM objective of the Stable Diffusion families: the epsilon or v-prediction target, the
signal-to-noise ratio of a timestep and min-SNR-gamma loss weights.

Noise and timesteps are drawn by :func:`hcp_core.train.diffusion.draw_noise_and_timesteps` (keyed
per sample, shared with the flow families).
"""
from __future__ import annotations

from typing import Optional

import torch


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: Optional[float], prediction_type: str) -> Optional[torch.Tensor]:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma)/SNR, or /(SNR+1) for v-prediction."""
    if gamma is None:
        return None
    clipped = torch.clamp(snr_values, max=gamma)
    return clipped / (snr_values + 1.0) if prediction_type == "v_prediction" else clipped / snr_values
