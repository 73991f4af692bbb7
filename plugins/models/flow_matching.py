"""The flow-matching (rectified flow) training objective of SD3 / FLUX, and FLUX latent packing.

One training step, per sample ``i`` with latents ``x0``::

    sigma_i = sample_sigmas(ids, seed=..., step=..., scheme=..., shift=...)   # in (0, 1)
    noise   = draw_noise(latents, ids, seed=..., step=...)
    x_t     = noisy_latents(latents, noise, sigmas)       # (1 - sigma) * x0 + sigma * noise
    target  = velocity_target(latents, noise)             # noise - x0
    weights = loss_weights(sigmas, "none")                # None, or one weight per sample

The model is fed ``x_t`` and a timestep made from sigma: SD3's transformer takes ``sigma * 1000``,
FLUX's takes ``sigma`` itself (it multiplies by 1000 inside) plus, for guidance-distilled models,
a ``guidance`` tensor. FLUX also wants its latents packed into 2x2 patches (:func:`pack_latents`)
with position ids (:func:`latent_image_ids`, :func:`text_ids`); its prediction is unpacked with
:func:`unpack_latents` before the loss (or the target packed instead).

Like the DDPM maths in :mod:`hcp_core.train.diffusion`, everything random is drawn per sample from
a generator keyed on (seed, step, sample id), so results do not depend on batch layout or process
count. Noise uses stream 0, exactly the noise the DDPM objective draws for the same key; sigmas use
their own stream (:data:`SIGMA_STREAM`), so they are independent of the noise.

Timestep shift, static or resolution dependent. Both are the same map of sigma: the static shift
``s`` (SD3: ``s * sigma / (1 + (s - 1) * sigma)``) equals FLUX's exponential time shift
:func:`dynamic_shift` with ``mu = log(s)``. So the caller picks *one number* per batch:

* static (SD3 style, kohya's ``--discrete_flow_shift``/``--training_shift``): ``shift = s`` from
  the config;
* resolution dependent (FLUX style, kohya's ``--timestep_sampling flux_shift``):
  ``shift = math.exp(flux_shift(image_seq_len))`` where ``image_seq_len = (H // 2) * (W // 2)``
  for latents of height ``H`` and width ``W`` (the packed sequence length; a bucketed batch has
  one resolution, hence one shift);

and passes it to :func:`sample_sigmas` as ``shift``. Applying :func:`dynamic_shift` to sigmas drawn
with ``shift=1.0`` gives the same values (up to float rounding); never apply both.

This module imports only torch (and the repo's seeding helper); diffusers is not needed.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from hcp_core.devices import to_device
from hcp_core.train.diffusion import draw_noise_and_timesteps, sample_seed

#: ``sample_seed`` stream for sigmas. Streams 0 (noise, DDPM timesteps), 1 (VAE latent sampling)
#: and 2 (the per-micro-step global seed) are taken by the training loop.
SIGMA_STREAM = 3

#: Sigmas are kept this far inside (0, 1): a sigma of exactly 0 makes ``sigma_sqrt`` weights
#: infinite, and the ``mode`` scheme can return exactly 1 (u = 0), sigmoid can round to 1.
SIGMA_EPS = 1e-6

SAMPLING_SCHEMES = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _draw_u(g: torch.Generator, scheme: str, logit_mean: float, logit_std: float, mode_scale: float) -> torch.Tensor:
    """One draw, shape [1], exactly as diffusers' ``compute_density_for_timestep_sampling`` with
    ``batch_size=1`` and this generator on the CPU."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(1,), generator=g))
    u = torch.rand((1,), generator=g)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(
    sample_ids: Sequence[int],
    *,
    seed: int,
    step: int,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """One noise level sigma in (0, 1) per sample, float32, shape ``[len(sample_ids)]``.

    Each sample's sigma comes from its own generator seeded with
    ``sample_seed(seed, step, sample_id, stream=SIGMA_STREAM)``, so it depends on nothing but
    (seed, step, sample id): not on the other samples of the batch nor on the process count.

    ``scheme`` is the density of diffusers' ``compute_density_for_timestep_sampling`` (SD3 paper):

    * ``"uniform"``: ``u ~ U[0, 1)``;
    * ``"logit_normal"``: ``sigmoid(n)``, ``n ~ N(logit_mean, logit_std)`` (kohya's ``sigmoid``
      sampling with ``sigmoid_scale = logit_std``);
    * ``"mode"``: ``1 - u - mode_scale * (cos(pi * u / 2) ** 2 - 1 + u)``, ``u ~ U[0, 1)``
      (stays in [0, 1] only for ``mode_scale`` up to about 1.75).

    Then the time shift ``shift * sigma / (1 + (shift - 1) * sigma)`` (``shift > 1`` moves sigmas
    towards 1, i.e. more noise; ``1.0`` is none). For FLUX's resolution-dependent shift pass
    ``shift = math.exp(flux_shift(image_seq_len))`` (see the module docstring). Finally sigmas are
    clamped into ``[SIGMA_EPS, 1 - SIGMA_EPS]``.
    """
    if scheme not in SAMPLING_SCHEMES:
        raise ValueError(f"unknown timestep sampling scheme {scheme!r}; expected one of {SAMPLING_SCHEMES}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    draws = [
        _draw_u(torch.Generator().manual_seed(sample_seed(seed, step, int(sid), stream=SIGMA_STREAM)),
                scheme, logit_mean, logit_std, mode_scale)
        for sid in sample_ids
    ]
    sigmas = torch.cat(draws) if draws else torch.zeros(0)
    if shift != 1.0:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return to_device(sigmas.clamp(SIGMA_EPS, 1 - SIGMA_EPS), device)


def flux_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the packed sequence length, through
    (base_seq_len, base_shift) and (max_seq_len, max_shift), as FluxPipeline's ``calculate_shift``.

    ``image_seq_len`` is ``(H // 2) * (W // 2)`` for latents of height H and width W (1024x1024
    pixels: 4096, mu = 1.15). ``exp(mu)`` is the equivalent static ``shift``.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def dynamic_shift(sigmas: torch.Tensor, mu: Union[float, torch.Tensor]) -> torch.Tensor:
    """FLUX's exponential time shift ``exp(mu) / (exp(mu) + (1 / sigma - 1))``, as
    FlowMatchEulerDiscreteScheduler's ``time_shift(mu, 1.0, sigmas)``.

    ``mu`` is a number or a tensor broadcastable to ``sigmas`` (e.g. one mu per sample). Equal to
    the static shift with ``shift = exp(mu)``; use one or the other, not both.
    """
    e = mu.to(device=sigmas.device, dtype=sigmas.dtype).exp() if isinstance(mu, torch.Tensor) else math.exp(mu)
    return e / (e + (1 / sigmas - 1))


def draw_noise(latents: torch.Tensor, sample_ids: Sequence[int], *, seed: int, step: int) -> torch.Tensor:
    """Per-sample Gaussian noise shaped like ``latents`` (its dtype and device).

    Sample ``i``'s noise is drawn from a generator seeded with ``sample_seed(seed, step, id)``
    (stream 0): the same noise the DDPM objective (``draw_noise_and_timesteps``) draws for that
    key, independent of batch layout and process count.
    """
    # The DDPM helper draws the noise first from each sample's generator; its timestep draw comes
    # after and does not change the noise, so a single-timestep schedule is a free throw-away.
    noise, _ = draw_noise_and_timesteps(latents, sample_ids, seed=seed, step=step, num_train_timesteps=1)
    return noise


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sigmas`` ([B] or already broadcastable) shaped [B, 1, ...] to broadcast over ``like``."""
    sigmas = sigmas.to(device=like.device, dtype=like.dtype)
    if sigmas.ndim == 1:
        sigmas = sigmas.reshape(-1, *([1] * (like.ndim - 1)))
    return sigmas


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The point on the straight path from data to noise: ``(1 - sigma) * latents + sigma * noise``.

    ``sigmas`` is one value per sample ([B], or already shaped to broadcast); it is cast to the
    latents' dtype and device. Works for image latents [B, C, H, W] and packed ones [B, N, D].
    """
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer predicts: the velocity ``noise - latents`` (d x_t / d sigma)."""
    return noise - latents


def loss_weights(sigmas: torch.Tensor, scheme: str) -> Optional[torch.Tensor]:
    """Per-sample loss weights as diffusers' ``compute_loss_weighting_for_sd3``, or None.

    * ``"none"``: None (all ones; the caller skips weighting, like ``min_snr_weights``);
    * ``"sigma_sqrt"``: ``sigma ** -2`` (float32);
    * ``"cosmap"``: ``2 / (pi * (1 - 2 * sigma + 2 * sigma ** 2))``.
    """
    if scheme == "none":
        return None
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise ValueError(f"unknown loss weighting {scheme!r}; expected one of {LOSS_WEIGHTINGS}")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 patchify: [B, C, H, W] -> [B, (H/2) * (W/2), C * 4] (FluxPipeline._pack_latents).

    H and W (latent size) must be even.
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (H/2) * (W/2), C * 4] -> [B, C, H, W].

    ``height`` and ``width`` are the *latent* size (even), not pixels.
    """
    b, n, d = packed.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not match a {height}x{width} latent")
    x = packed.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(
    height: int, width: int, device: Optional[Union[str, torch.device]], dtype: torch.dtype
) -> torch.Tensor:
    """FLUX position ids of the packed latent tokens, [(H/2) * (W/2), 3]: (0, row, column).

    ``height`` and ``width`` are the latent size; the same as FluxPipeline's
    ``_prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)``.
    """
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return to_device(ids.reshape(h * w, 3), device, dtype)


def text_ids(seq_len: int, device: Optional[Union[str, torch.device]], dtype: torch.dtype) -> torch.Tensor:
    """FLUX position ids of the text tokens: zeros [seq_len, 3]."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)
