"""The randomness of one training step, shared by every family: per-sample seeds, noise and
timesteps, and the guided prediction of DreamArtist (:class:`TrainingGuidance`, which a prompt
encoder hands to its family). Each family's objective (targets, SNR weights) is its own: the DDPM
maths of SD/SDXL live in the ``sd`` family plugin, flow matching in the flow families'.

Noise and timesteps are drawn per sample from a generator keyed on (seed, step, sample id), so
they do not depend on batch layout or process count: a 2-process run draws the same noise as a
1-process run of the same global batch, and a resumed run draws what the uninterrupted one did.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import attrs
import torch

from ..devices import to_device

_MIX = 0x9E3779B97F4A7C15  # splitmix constant, spreads nearby keys apart


def sample_seed(seed: int, step: int, sample_id: int, stream: int = 0) -> int:
    """A 63-bit seed for one sample of one step."""
    x = (seed * 1_000_003 + step) * _MIX + sample_id * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def draw_noise_and_timesteps(
    latents: torch.Tensor,
    sample_ids: Sequence[int],
    *,
    seed: int,
    step: int,
    num_train_timesteps: int,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Gaussian noise shaped like ``latents`` and integer timesteps in [0, T)."""
    noises, steps = [], []
    shape = latents.shape[1:]
    for sid in sample_ids:
        g = torch.Generator().manual_seed(sample_seed(seed, step, int(sid)))
        n = torch.randn(shape, generator=g, dtype=torch.float32)
        if noise_offset:
            # Offset noise (a per-channel constant) lets the model learn very dark/bright images.
            n = n + noise_offset * torch.randn((shape[0], 1, 1), generator=g, dtype=torch.float32)
        noises.append(n)
        steps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
    noise = to_device(torch.stack(noises), latents.device, latents.dtype)
    timesteps = to_device(torch.cat(steps), latents.device)
    return noise, timesteps


@attrs.frozen
class TrainingGuidance:
    """Classifier-free guidance during training (DreamArtist): the loss is taken on
    ``pred(negative) + scale(t) * (pred(positive) - pred(negative))``.

    A prompt encoder that carries one as its ``guidance`` attribute (prompt tuning sets it) asks
    the SD family for the negative branch; ``negative_prompts`` turns a batch's prompts into their
    negative prompts. The scale is ``scale`` at every timestep, or with ``scale_noisy`` moves from
    ``scale`` at t = 0 to ``scale_noisy`` at t = T - 1 along ``curve`` of r = t / (T - 1):
    "linear" r, "cos" sin(r * pi / 2), "cos2" 1 - cos(r * pi / 2) (the original toolbox's "ln",
    "cos" and "cos2").
    """

    negative_prompts: Callable[[List[str]], List[str]]
    scale: float
    scale_noisy: Optional[float] = None
    curve: str = "linear"

    def scales(self, timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        """The guidance scale of each sample, float32 ``[B]``."""
        if self.scale_noisy is None:
            return torch.full(timesteps.shape, float(self.scale), device=timesteps.device)
        r = timesteps.float() / (num_train_timesteps - 1)
        if self.curve == "cos":
            r = torch.sin(r * math.pi / 2)
        elif self.curve == "cos2":
            r = 1 - torch.cos(r * math.pi / 2)
        elif self.curve != "linear":
            raise ValueError(f"unknown guidance curve {self.curve!r}")
        return self.scale + (self.scale_noisy - self.scale) * r

    def negative_batch(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """``batch`` with its prompts replaced by their negative prompts (everything else shared)."""
        return {**batch, "prompts": self.negative_prompts(list(batch["prompts"]))}

    def combine(self, pred_negative: torch.Tensor, pred_positive: torch.Tensor, timesteps: torch.Tensor,
                num_train_timesteps: int) -> torch.Tensor:
        """The guided prediction (gradients reach both branches)."""
        s = self.scales(timesteps, num_train_timesteps).to(pred_positive.device)
        s = s.reshape(-1, *([1] * (pred_positive.dim() - 1)))
        return pred_negative + s * (pred_positive - pred_negative)
