"""The built-in optimizers' factories: ``factory(config, *, params) -> torch.optim.Optimizer``.

``params`` are parameter groups, each with its own ``lr``; options come from the config only.
Packages of optional optimizers are imported here, after hcp checked they are installed.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

Groups = List[Dict[str, Any]]


def can_fuse(groups: Groups) -> bool:
    """Whether torch's fused Adam kernel takes these parameters: floating point, all on one CPU
    or CUDA device. It updates every tensor in one kernel (on CPU about 5x faster than the
    per-tensor loop for LoRA's many small tensors)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (
        bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )  # fmt: skip


def adamw(config: Any, *, params: Groups) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
                             fused=can_fuse(params) or None)  # fmt: skip


def adamw8bit(config: Any, *, params: Groups) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)


def sgd(config: Any, *, params: Groups) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay)


def adafactor(config: Any, *, params: Groups) -> torch.optim.Optimizer:
    # torch's own Adafactor honours each group's lr (transformers' variant defaults to relative steps).
    return torch.optim.Adafactor(params, weight_decay=config.weight_decay)


def lion(config: Any, *, params: Groups) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(params, betas=tuple(config.betas), weight_decay=config.weight_decay)


def prodigy(config: Any, *, params: Groups) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(
        params, betas=tuple(config.betas), beta3=config.beta3, eps=config.eps, weight_decay=config.weight_decay,
        decouple=config.decouple, use_bias_correction=config.use_bias_correction,
        safeguard_warmup=config.safeguard_warmup, d0=config.d0, d_coef=config.d_coef,
        growth_rate=math.inf if config.growth_rate is None else config.growth_rate,
    )  # fmt: skip


def adamw_schedulefree(config: Any, *, params: Groups) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(
        params, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, r=config.r, weight_lr_power=config.weight_lr_power,
    )  # fmt: skip
    optimizer.train()  # it refuses to step in eval mode; hcp switches to eval only around exports
    return optimizer
