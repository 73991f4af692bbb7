"""Config classes of the built-in model families (light: attrs only, no torch; imported at start-up).

Users write them as ``[model] family = { type = "flux", shift = 3.0 }`` (or ``family = "flux"`` for
the defaults); unknown keys are errors with a did-you-mean, bad values name the key and what is
allowed (see :mod:`hcp_core.config.validators`).
"""
from __future__ import annotations

from typing import Any

import attrs

from hcp_core.config.validators import fail, greater_than, in_range, is_finite_number, one_of

#: ``timestep_sampling`` schemes (density of sigma), as diffusers' ``compute_density_for_timestep_sampling``.
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
#: ``loss_weighting`` schemes, as diffusers' ``compute_loss_weighting_for_sd3``.
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
#: The ``shift`` value that selects FLUX's resolution-dependent shift.
DYNAMIC_SHIFT = "dynamic"
#: The smallest static shift accepted.
MIN_SHIFT = 0.1
#: FLUX.1's T5 context: 512 tokens (dev; schnell was trained with 256); the most either family takes.
MAX_T5_TOKENS = 512
#: StableDiffusion3Pipeline's default T5 context.
SD3_T5_TOKENS = 256
#: SD3's scheduler shift (FlowMatchEulerDiscreteScheduler ``shift`` in SD3 / 3.5 checkpoints).
SD3_SHIFT = 3.0


def _shift_value(value: Any) -> Any:
    """A whole number becomes a float (``shift = 3`` is ``3.0``); anything else is checked as is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_shift(inst: Any, attribute: "attrs.Attribute[Any]", value: Any, *, dynamic: bool = True) -> None:
    """A static shift of at least :data:`MIN_SHIFT`, or (``dynamic``) the string :data:`DYNAMIC_SHIFT`."""
    if value == DYNAMIC_SHIFT and dynamic:
        return
    if value == DYNAMIC_SHIFT:
        fail(attribute, f"{DYNAMIC_SHIFT!r} (FLUX's resolution-dependent shift) does not apply to SD3, which is "
                        "trained and sampled with one static shift (the scheduler's, 3.0): give a number of at "
                        f"least {MIN_SHIFT}, got {value!r}")
    allowed = f" or the string {DYNAMIC_SHIFT!r} (FLUX's resolution-dependent shift)" if dynamic else ""
    if isinstance(value, str) or not is_finite_number(value):
        fail(attribute, f"must be a number of at least {MIN_SHIFT}{allowed}, got {value!r}")
    if value < MIN_SHIFT:
        fail(attribute, f"must be at least {MIN_SHIFT} (1.0 = no shift){allowed.replace(' the string', '')}, "
                        f"got {value!r}")


def _check_static_shift(inst: Any, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    _check_shift(inst, attribute, value, dynamic=False)


def _loss_weighting() -> Any:
    """Per-sample loss weight: "none", "sigma_sqrt" (sigma ** -2) or "cosmap"."""
    return attrs.field(default="none", validator=one_of(LOSS_WEIGHTING))


def _t5_length(default: int) -> Any:
    """T5 tokens per prompt, padded and truncated to this length (1 to :data:`MAX_T5_TOKENS`)."""
    return attrs.field(default=default, validator=in_range(1, MAX_T5_TOKENS))


@attrs.define
class FlowMatchingConfig:
    """What the flow-matching families (``flux``, ``sd3``) share: how noise levels are drawn."""

    #: Density of the noise level sigma: "uniform", "logit_normal" (SD3 paper; kohya's "sigmoid") or "mode".
    timestep_sampling: str = attrs.field(default="logit_normal", validator=one_of(TIMESTEP_SAMPLING))
    #: Mean and standard deviation of the normal behind "logit_normal".
    logit_mean: float = attrs.field(default=0.0, validator=in_range(-10, 10))
    logit_std: float = attrs.field(default=1.0, validator=[greater_than(0), in_range(0, 10)])
    #: Scale of the "mode" density (diffusers' default 1.29; beyond about 1.75 sigmas leave [0, 1]).
    mode_scale: float = attrs.field(default=1.29, validator=in_range(0, 1.75))


@attrs.define
class FluxConfig(FlowMatchingConfig):
    """FLUX.1 (dev- or schnell-style): a flow-matching transformer, CLIP-L pooled + T5 text
    conditioning, a 16-channel VAE. Options: how noise levels are drawn (``timestep_sampling``,
    ``logit_mean``, ``logit_std``, ``mode_scale``, ``shift``), the loss weighting, the distilled
    ``guidance`` fed to dev-style models, and the T5 context length."""

    #: Time shift of sigma: a number (1.0 = none; SD3 uses 3.0) or "dynamic": FLUX's
    #: resolution-dependent shift, exp(mu) with mu linear in the packed token count (kohya's flux_shift).
    shift: Any = attrs.field(default=DYNAMIC_SHIFT, converter=_shift_value, validator=_check_shift)
    #: Per-sample loss weight: "none", "sigma_sqrt" (sigma ** -2) or "cosmap".
    loss_weighting: str = _loss_weighting()
    #: The distilled guidance scale fed during training to models that embed one (FLUX.1-dev);
    #: schnell-style models have no guidance embedding and ignore it. kohya recommends 1.0.
    guidance: float = attrs.field(default=1.0, validator=in_range(0, 100))
    #: T5 tokens per prompt (padded and truncated to this length), as FluxPipeline's max_sequence_length.
    max_sequence_length: int = _t5_length(MAX_T5_TOKENS)


@attrs.define
class SD3Config(FlowMatchingConfig):
    """Stable Diffusion 3 / 3.5: an MMDiT flow-matching transformer, CLIP-L + CLIP-G + T5 text
    conditioning, a 16-channel VAE. Options: how noise levels are drawn (``timestep_sampling``,
    ``logit_mean``, ``logit_std``, ``mode_scale``, ``shift``), the loss weighting and the T5
    context length."""

    #: Static time shift of sigma, s * sigma / (1 + (s - 1) * sigma): 3.0 is SD3's scheduler shift
    #: (kohya's --training_shift / --discrete_flow_shift); 1.0 = none. "dynamic" is refused.
    shift: Any = attrs.field(default=SD3_SHIFT, converter=_shift_value, validator=_check_static_shift)
    #: Per-sample loss weight: "none", "sigma_sqrt" (sigma ** -2) or "cosmap".
    loss_weighting: str = _loss_weighting()
    #: T5 tokens per prompt (padded and truncated to this length), as StableDiffusion3Pipeline's
    #: max_sequence_length (default 256; at most 512).
    max_sequence_length: int = _t5_length(SD3_T5_TOKENS)
