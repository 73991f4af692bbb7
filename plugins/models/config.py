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
#: FLUX.1's T5 context: 512 tokens (dev; schnell was trained with 256).
MAX_T5_TOKENS = 512


def _shift_value(value: Any) -> Any:
    """A whole number becomes a float (``shift = 3`` is ``3.0``); anything else is checked as is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_shift(inst: Any, attribute: "attrs.Attribute[Any]", value: Any) -> None:
    if value == DYNAMIC_SHIFT:
        return
    if isinstance(value, str) or not is_finite_number(value):
        fail(attribute, f"must be a number of at least {MIN_SHIFT} or the string {DYNAMIC_SHIFT!r} "
                        f"(FLUX's resolution-dependent shift), got {value!r}")
    if value < MIN_SHIFT:
        fail(attribute, f"must be at least {MIN_SHIFT} (1.0 = no shift) or {DYNAMIC_SHIFT!r}, got {value!r}")


@attrs.define
class FluxConfig:
    """FLUX.1 (dev- or schnell-style): a flow-matching transformer, CLIP-L pooled + T5 text
    conditioning, a 16-channel VAE. Options: how noise levels are drawn (``timestep_sampling``,
    ``logit_mean``, ``logit_std``, ``mode_scale``, ``shift``), the loss weighting, the distilled
    ``guidance`` fed to dev-style models, and the T5 context length."""

    #: Density of the noise level sigma: "uniform", "logit_normal" (SD3 paper; kohya's "sigmoid") or "mode".
    timestep_sampling: str = attrs.field(default="logit_normal", validator=one_of(TIMESTEP_SAMPLING))
    #: Mean and standard deviation of the normal behind "logit_normal".
    logit_mean: float = attrs.field(default=0.0, validator=in_range(-10, 10))
    logit_std: float = attrs.field(default=1.0, validator=[greater_than(0), in_range(0, 10)])
    #: Scale of the "mode" density (diffusers' default 1.29; beyond about 1.75 sigmas leave [0, 1]).
    mode_scale: float = attrs.field(default=1.29, validator=in_range(0, 1.75))
    #: Time shift of sigma: a number (1.0 = none; SD3 uses 3.0) or "dynamic": FLUX's
    #: resolution-dependent shift, exp(mu) with mu linear in the packed token count (kohya's flux_shift).
    shift: Any = attrs.field(default=DYNAMIC_SHIFT, converter=_shift_value, validator=_check_shift)
    #: Per-sample loss weight: "none", "sigma_sqrt" (sigma ** -2) or "cosmap".
    loss_weighting: str = attrs.field(default="none", validator=one_of(LOSS_WEIGHTING))
    #: The distilled guidance scale fed during training to models that embed one (FLUX.1-dev);
    #: schnell-style models have no guidance embedding and ignore it. kohya recommends 1.0.
    guidance: float = attrs.field(default=1.0, validator=in_range(0, 100))
    #: T5 tokens per prompt (padded and truncated to this length), as FluxPipeline's max_sequence_length.
    max_sequence_length: int = attrs.field(default=MAX_T5_TOKENS, validator=in_range(1, MAX_T5_TOKENS))
