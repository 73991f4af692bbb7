"""The built-in schedulers' factories: ``factory(config, *, optimizer, total_steps) -> LRScheduler``.

hcp's own schedules warm up from ``lr / warmup_steps`` (the first step already learns); the
diffusers ones are built by ``diffusers.optimization`` itself, so they follow its formulas
(warm-up from 0), except ``polynomial``, whose diffusers version decays towards ``lr_end`` from the
optimizer's *default* lr: here every group decays from its own lr.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from hcp_core.errors import ConfigError

Shape = Callable[[float], float]


def _with_warmup(config: Any, total_steps: int, shape: Shape) -> Callable[[int], float]:
    """``(step + 1) / warmup`` during the warm-up, then ``shape(progress)``, progress in [0, 1]."""
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return shape(min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup))))

    return factor


def constant(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    return LambdaLR(optimizer, _with_warmup(config, total_steps, lambda p: 1.0))


def linear(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    floor = config.min_lr_ratio
    return LambdaLR(optimizer, _with_warmup(config, total_steps, lambda p: floor + (1.0 - floor) * (1.0 - p)))


def cosine(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    floor = config.min_lr_ratio
    return LambdaLR(optimizer, _with_warmup(
        config, total_steps, lambda p: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))))


def one_cycle(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    max_lrs = [g["lr"] for g in optimizer.param_groups]
    pct = config.warmup_steps / total_steps if config.warmup_steps else 0.3
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=min(max(pct, 1e-3), 0.999), cycle_momentum=False,
    )


def constant_with_warmup(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    from diffusers.optimization import get_constant_schedule_with_warmup

    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup_steps)


def cosine_with_restarts(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    return get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps, num_cycles=config.num_cycles)


def piecewise_constant(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    from diffusers.optimization import get_piecewise_constant_schedule

    rules = [f"{factor!r}:{step}" for factor, step in zip(config.factors, config.steps)] + [repr(config.factors[-1])]
    return get_piecewise_constant_schedule(optimizer, step_rules=",".join(rules))


def polynomial(config: Any, *, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    warmup, end, power = config.warmup_steps, config.lr_end, config.power
    low = [g for g in optimizer.param_groups if 0 < g["lr"] <= end]
    if low:
        raise ConfigError(f"train.scheduler.lr_end = {end} is not below the lr {low[0]['lr']} of parameter group "
                          f"'{low[0].get('name', 0)}': polynomial decays every group's lr down to lr_end; lower lr_end")

    def for_group(lr: float) -> Callable[[int], float]:
        if lr == 0:  # a frozen group (lr = 0) stays at 0
            return lambda step: 1.0

        def factor(step: int) -> float:  # diffusers' formula, with this group's own lr
            if step < warmup:
                return step / max(1, warmup)
            if step > total_steps:
                return end / lr
            remaining = 1 - (step - warmup) / max(1, total_steps - warmup)
            return ((lr - end) * remaining**power + end) / lr

        return factor

    return LambdaLR(optimizer, [for_group(g["lr"]) for g in optimizer.param_groups])
