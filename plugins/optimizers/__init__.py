"""Built-in optimizers: torch's AdamW, SGD and Adafactor, and Lion, AdamW8bit, Prodigy and
schedule-free AdamW from optional packages (``pip install "hcp[optim]"``).

Each has its own options; a package an optimizer needs is named in its config's ``requires`` and
checked before the model loads. The factories live in :mod:`.factories` (they import torch).
"""
from __future__ import annotations

from typing import ClassVar, Optional, Tuple

import attrs

from hcp_core.config.validators import at_least, each, fail, in_range
from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry

#: Adam's betas and SGD's momentum: 1 or more never forgets or diverges.
_unit_open = in_range(0, 1, high_open=True)
#: Adam's epsilon: 0 divides by zero.
_eps = in_range(0, 1, low_open=True)


def _betas(default: Tuple[float, float] = (0.9, 0.999)):  # type: ignore[no-untyped-def]
    return attrs.field(default=default, validator=each(_unit_open))


@attrs.define
class AdamWConfig:
    """AdamW (torch), run as torch's fused kernel when every trained tensor is on one CPU or CUDA device."""

    weight_decay: float = attrs.field(default=1e-2, validator=at_least(0))
    betas: Tuple[float, float] = _betas()
    eps: float = attrs.field(default=1e-8, validator=_eps)


@attrs.define
class AdamW8bitConfig(AdamWConfig):
    """AdamW with 8-bit optimizer state (bitsandbytes): about a quarter of AdamW's state memory."""

    requires: ClassVar[tuple] = (("bitsandbytes", "bitsandbytes"),)


def _nesterov_needs_momentum(inst: "SgdConfig", attribute: attrs.Attribute, value: bool) -> None:
    if value and inst.momentum == 0:
        fail(attribute, "Nesterov momentum needs momentum > 0: set train.optimizer.momentum (e.g. 0.9) or nesterov = false")


@attrs.define
class SgdConfig:
    """Stochastic gradient descent (torch), with optional (Nesterov) momentum."""

    weight_decay: float = attrs.field(default=1e-2, validator=at_least(0))
    momentum: float = attrs.field(default=0.0, validator=_unit_open)
    nesterov: bool = attrs.field(default=False, validator=_nesterov_needs_momentum)


@attrs.define
class AdafactorConfig:
    """Adafactor (torch's, which follows each group's lr): factored second moments, little state."""

    weight_decay: float = attrs.field(default=1e-2, validator=at_least(0))


@attrs.define
class LionConfig:
    """Lion (lion-pytorch): sign updates; usually wants a 3-10x smaller lr than AdamW."""

    weight_decay: float = attrs.field(default=1e-2, validator=at_least(0))
    betas: Tuple[float, float] = _betas((0.9, 0.99))
    requires: ClassVar[tuple] = (("lion_pytorch", "lion-pytorch"),)


@attrs.define
class ProdigyConfig:
    """Prodigy (prodigyopt): Adam that estimates its own step size; set the adapters' lr to 1.0."""

    weight_decay: float = attrs.field(default=0.0, validator=at_least(0))
    betas: Tuple[float, float] = _betas()
    #: Decay of the step-size estimate's running sums; unset: sqrt(betas[1]).
    beta3: Optional[float] = attrs.field(default=None, validator=_unit_open)
    eps: float = attrs.field(default=1e-8, validator=_eps)
    #: AdamW-style weight decay (True) or Adam's L2 penalty (False).
    decouple: bool = True
    use_bias_correction: bool = False
    #: Leave the lr out of the estimate's denominator during warm-up (steadier with a warm-up).
    safeguard_warmup: bool = False
    #: The initial step-size estimate.
    d0: float = attrs.field(default=1e-6, validator=in_range(0, 1, low_open=True))
    #: Scales the estimate: below 1 is more careful, above 1 more aggressive.
    d_coef: float = attrs.field(default=1.0, validator=in_range(0, 1000, low_open=True))
    #: Largest factor the estimate may grow by per step; unset: unbounded.
    growth_rate: Optional[float] = attrs.field(default=None, validator=at_least(1))
    requires: ClassVar[tuple] = (("prodigyopt", "prodigyopt"),)


@attrs.define
class AdamWScheduleFreeConfig:
    """Schedule-free AdamW (schedulefree): no lr schedule needed; exports and samples its averaged weights."""

    weight_decay: float = attrs.field(default=0.0, validator=at_least(0))
    betas: Tuple[float, float] = _betas()
    eps: float = attrs.field(default=1e-8, validator=_eps)
    #: Linear lr warm-up inside the optimizer (the schedule must stay constant).
    warmup_steps: int = attrs.field(default=0, validator=in_range(0, 100_000_000))
    #: Polynomial weighting of the average (0: uniform).
    r: float = attrs.field(default=0.0, validator=in_range(0, 100))
    #: How strongly later, larger-lr iterates weigh in the average.
    weight_lr_power: float = attrs.field(default=2.0, validator=in_range(0, 100))
    requires: ClassVar[tuple] = (("schedulefree", "schedulefree"),)
    #: It trains on other weights than it exports: hcp calls its eval()/train() around exports.
    schedule_free: ClassVar[bool] = True


#: name -> config class; each factory is the function of that name in .factories.
OPTIMIZERS = {
    "adamw": AdamWConfig,
    "adamw8bit": AdamW8bitConfig,
    "sgd": SgdConfig,
    "adafactor": AdafactorConfig,
    "lion": LionConfig,
    "prodigy": ProdigyConfig,
    "adamw_schedulefree": AdamWScheduleFreeConfig,
}


@hookimpl
def hcp_register_optimizers(registry: FamilyRegistry) -> None:
    for name, config in OPTIMIZERS.items():
        registry.add(name, config=config, factory=f"hcp_plugins.optimizers.factories:{name}")
