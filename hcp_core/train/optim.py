"""Optimizers and learning-rate schedules chosen by registry name (never an import path)."""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable, Dict, List

import torch

from ..config.schema import OptimizerConfig, SchedulerConfig
from ..errors import ConfigError, did_you_mean


def can_fuse(groups: List[Dict[str, Any]]) -> bool:
    """Whether torch's fused Adam kernel takes these parameters: floating point, all on one CPU
    or CUDA device. It updates every tensor in one kernel (on CPU about 5x faster than the
    per-tensor loop for LoRA's many small tensors)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (
        bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )  # fmt: skip


def _adamw(groups: List[Dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=can_fuse(groups) or None)  # fmt: skip


def _sgd(groups: List[Dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _adafactor(groups: List[Dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # torch's own Adafactor honours each group's lr (transformers' variant defaults to relative steps).
    return torch.optim.Adafactor(groups, weight_decay=cfg.weight_decay)


def _lion(groups: List[Dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _adamw8bit(groups: List[Dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


#: name -> (factory, package it needs or None)
OPTIMIZERS: Dict[str, tuple[Callable[..., torch.optim.Optimizer], str | None]] = {
    "adamw": (_adamw, None),
    "sgd": (_sgd, None),
    "adafactor": (_adafactor, None),
    "lion": (_lion, "lion_pytorch"),
    "adamw8bit": (_adamw8bit, "bitsandbytes"),
}


def build_optimizer(groups: List[Dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.type`` over ``groups`` (each with its own ``lr``)."""
    if cfg.type not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer.type: unknown optimizer {cfg.type!r}.{did_you_mean(cfg.type, OPTIMIZERS)}"
            f" Known: {', '.join(OPTIMIZERS)}."
        )
    factory, package = OPTIMIZERS[cfg.type]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.optimizer.type = {cfg.type!r} needs the package '{package}': pip install {package}")
    return factory(groups, cfg)


def _lr_lambda(cfg: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def progress(step: int) -> float:
        return min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))

    def with_warmup(shape: Callable[[float], float]) -> Callable[[int], float]:
        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            return shape(progress(step))

        return factor

    shapes: Dict[str, Callable[[float], float]] = {
        "constant": lambda p: 1.0,
        "linear": lambda p: floor + (1.0 - floor) * (1.0 - p),
        "cosine": lambda p: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)),
    }
    return with_warmup(shapes[cfg.type])


SCHEDULERS = ("constant", "linear", "cosine", "one_cycle")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int):
    """A per-optimizer-step LR scheduler; warm-up is linear from ``lr/warmup_steps`` to ``lr``."""
    if cfg.type not in SCHEDULERS:
        raise ConfigError(
            f"train.scheduler.type: unknown scheduler {cfg.type!r}.{did_you_mean(cfg.type, SCHEDULERS)}"
            f" Known: {', '.join(SCHEDULERS)}."
        )
    if cfg.type == "one_cycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        pct = cfg.warmup_steps / total_steps if cfg.warmup_steps else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=min(max(pct, 1e-3), 0.999),
            cycle_momentum=False,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
