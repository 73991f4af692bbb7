"""Samplers by name: hcp's short names, the diffusers classes, and webui's names for the metadata.

A sampler is always built from the model's own scheduler config (the noise schedule it was trained
with, ``ModelBundle.scheduler.config``), with a few options on top for the variants (Karras sigmas,
PLMS without Runge-Kutta warm-up). Importing this module imports no torch.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

# The table of sampler names is plain data at the config level (the schema validates [sample] with it).
from ..config.values import SCHEDULERS, SchedulerChoice, unknown_scheduler
from ..errors import UserError, did_you_mean


class UnknownSchedulerError(UserError):
    """A sampler name hcp does not know."""


def scheduler_choice(name: str, where: Optional[str] = "--scheduler") -> SchedulerChoice:
    """The sampler called ``name``; an unknown name raises :class:`UnknownSchedulerError`
    (its message starts with ``where``, when given)."""
    problem = unknown_scheduler(name)
    if problem is not None:
        raise UnknownSchedulerError(f"{where}: {problem}" if where else problem)
    return SCHEDULERS[name]


def scheduler_from_webui_name(webui_name: str) -> SchedulerChoice:
    """The sampler webui writes as ``webui_name`` ("Euler a", "DPM++ 2M", ...)."""
    for choice in SCHEDULERS.values():
        if choice.webui_name.lower() == webui_name.strip().lower():
            return choice
    known = [c.webui_name for c in SCHEDULERS.values()]
    raise UnknownSchedulerError(
        f"Sampler {webui_name!r} has no diffusers equivalent in hcp.{did_you_mean(webui_name, known)} "
        f"Known: {', '.join(known)}; or pass --scheduler."
    )


def make_scheduler(name: str, model_config: Mapping[str, Any]) -> Any:
    """A fresh diffusers sampler ``name`` on the model's noise schedule ``model_config``."""
    import diffusers

    choice = scheduler_choice(name)
    cls = getattr(diffusers, choice.diffusers_class)
    return cls.from_config(dict(model_config), **dict(choice.options))
