"""Built-in learning-rate schedulers: hcp's constant, linear, cosine and one_cycle (each with
``warmup_steps``; ``min_lr_ratio`` is the floor of linear and cosine), and the schedules of
``diffusers.optimization`` by their diffusers names: constant_with_warmup, cosine_with_restarts,
polynomial and piecewise_constant.

Every schedule scales each parameter group's own lr. The factories live in :mod:`.factories`.
"""
from __future__ import annotations

from typing import List

import attrs

from hcp_core.config.validators import at_least, each, fail, in_range
from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry

MAX_STEP = 100_000_000


def _warmup():  # type: ignore[no-untyped-def]
    return attrs.field(default=0, validator=at_least(0))  # beyond the run's length: a warm-up that never ends


@attrs.define
class WarmupScheduleConfig:
    """The options hcp's own schedules share: a linear warm-up and the floor of linear and cosine."""

    #: Steps over which the lr ramps linearly from lr/warmup_steps up to the group's lr.
    warmup_steps: int = _warmup()
    #: Floor of linear and cosine, as a fraction of the peak lr (constant and one_cycle accept and
    #: ignore it: one table fits all four, as before schedulers were plugins).
    min_lr_ratio: float = attrs.field(default=0.0, validator=in_range(0, 1))


@attrs.define
class ConstantConfig(WarmupScheduleConfig):
    """Constant lr after the warm-up."""

    @property
    def constant(self) -> bool:
        """True when the lr never changes (no warm-up): what schedule-free optimizers need."""
        return self.warmup_steps == 0


@attrs.define
class LinearConfig(WarmupScheduleConfig):
    """Linear decay from the lr to lr * min_lr_ratio after the warm-up."""


@attrs.define
class CosineConfig(WarmupScheduleConfig):
    """Half-cosine decay from the lr to lr * min_lr_ratio after the warm-up."""


@attrs.define
class OneCycleConfig(WarmupScheduleConfig):
    """torch's OneCycleLR: up to the lr over warmup_steps (30% of the run when 0), then annealed to ~0."""


@attrs.define
class ConstantWithWarmupConfig:
    """diffusers' constant_with_warmup: lr * step / warmup_steps during the warm-up (from 0), then the lr."""

    warmup_steps: int = _warmup()


@attrs.define
class CosineWithRestartsConfig:
    """diffusers' cosine_with_restarts: num_cycles cosine decays to 0 after the warm-up, each restarting at the lr."""

    warmup_steps: int = _warmup()
    num_cycles: int = attrs.field(default=1, validator=in_range(1, 10_000))


@attrs.define
class PolynomialConfig:
    """diffusers' polynomial: (lr - lr_end) * (1 - progress) ** power + lr_end after the warm-up, per group."""

    warmup_steps: int = _warmup()
    #: The lr reached at the end (absolute; below every group's lr).
    lr_end: float = attrs.field(default=1e-7, validator=at_least(0))
    #: 1 is linear decay; 2 quadratic...
    power: float = attrs.field(default=1.0, validator=in_range(0, 100, low_open=True))


def _increasing(inst: "PiecewiseConstantConfig", attribute: attrs.Attribute, value: List[int]) -> None:
    if any(b <= a for a, b in zip(value, value[1:])):
        fail(attribute, f"must be strictly increasing step numbers, got {value!r}")


def _one_more_factor(inst: "PiecewiseConstantConfig", attribute: attrs.Attribute, value: List[float]) -> None:
    if len(value) != len(inst.steps) + 1:
        fail(attribute, f"needs one factor per interval: {len(inst.steps) + 1} for {len(inst.steps)} steps "
                        f"(before the first step, between steps, after the last), got {len(value)}")


@attrs.define
class PiecewiseConstantConfig:
    """diffusers' piecewise_constant: the lr times factors[i] until steps[i], then times the last factor."""

    #: Steps where the factor changes, e.g. [100, 200].
    steps: List[int] = attrs.field(factory=list, validator=[each(in_range(1, MAX_STEP)), _increasing])
    #: One more factor than steps, e.g. [1.0, 0.1, 0.01].
    factors: List[float] = attrs.field(factory=lambda: [1.0], validator=[each(at_least(0)), _one_more_factor])


#: name -> config class; each factory is the function of that name in .factories.
SCHEDULERS = {
    "constant": ConstantConfig,
    "linear": LinearConfig,
    "cosine": CosineConfig,
    "one_cycle": OneCycleConfig,
    "constant_with_warmup": ConstantWithWarmupConfig,
    "cosine_with_restarts": CosineWithRestartsConfig,
    "polynomial": PolynomialConfig,
    "piecewise_constant": PiecewiseConstantConfig,
}


@hookimpl
def hcp_register_schedulers(registry: FamilyRegistry) -> None:
    for name, config in SCHEDULERS.items():
        registry.add(name, config=config, factory=f"hcp_plugins.schedulers.factories:{name}")
