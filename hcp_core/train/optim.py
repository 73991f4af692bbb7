"""Optimizers and learning-rate schedules: registry components (hooks ``hcp_register_optimizers``
and ``hcp_register_schedulers``) chosen by name, never by import path.

Schedule-free optimizers train on other weights than the ones to keep: :func:`evaluation_weights`
puts the kept ones in place around exports and samples.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..errors import UserError
from ..registry import OptimizerSpec, Registry, SchedulerSpec
from .packages import missing_package


def build_optimizer(groups: List[Dict[str, Any]], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The optimizer ``spec`` chose, over ``groups`` (each with its own ``lr``)."""
    problem = missing_package(spec, "train.optimizer")
    if problem:
        raise UserError(problem)
    return spec.build(params=groups)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: SchedulerSpec, total_steps: int) -> Any:
    """The per-optimizer-step LR scheduler ``spec`` chose, for a run of ``total_steps``."""
    problem = missing_package(spec, "train.scheduler")
    if problem:
        raise UserError(problem)
    return spec.build(optimizer=optimizer, total_steps=total_steps)


def _spec(family: str, spec_cls: type, name: str, options: Dict[str, Any], registry: Optional[Registry]) -> Any:
    from ..config import convert
    from ..plugins import get_registry

    registry = registry or get_registry()
    conv = convert.make_converter(registry)
    return convert.structure(conv, {"type": name, **options}, spec_cls, f"train.{family}")


def optimizer_spec(name: str = "adamw", registry: Optional[Registry] = None, **options: Any) -> OptimizerSpec:
    """``train.optimizer = { type = name, **options }`` validated as a pipeline would (for library use and tests)."""
    return _spec("optimizer", OptimizerSpec, name, options, registry)


def scheduler_spec(name: str = "constant", registry: Optional[Registry] = None, **options: Any) -> SchedulerSpec:
    """``train.scheduler = { type = name, **options }`` validated as a pipeline would."""
    return _spec("scheduler", SchedulerSpec, name, options, registry)


def _schedule_free(optimizer: Any) -> Any:
    """The schedule-free optimizer inside ``optimizer`` (accelerate wraps it), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None)) else None


@contextlib.contextmanager
def evaluation_weights(optimizer: Any) -> Iterator[None]:
    """Inside: the weights a schedule-free optimizer exports (its average ``x``); outside: the ones it
    trains on. Other optimizers: nothing happens.

    The training weights are copied back bit for bit afterwards (``train()`` alone would recompute
    them with rounding), so a run that exported at step N goes on exactly as one resumed from N.
    """
    inner = _schedule_free(optimizer)
    if inner is None:
        yield
        return
    params = [p for g in inner.param_groups for p in g["params"]]
    kept = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)
