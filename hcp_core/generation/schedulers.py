"""Samplers by name: hcp's short names, the diffusers classes, and webui's names for the metadata.

A sampler is always built from the model's own scheduler config (the noise schedule it was trained
with, ``ModelBundle.scheduler.config``), with a few options on top for the variants (Karras sigmas,
PLMS without Runge-Kutta warm-up). Importing this module imports no torch.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import attrs

from ..errors import UserError, did_you_mean


class UnknownSchedulerError(UserError):
    """A sampler name hcp does not know."""


@attrs.frozen
class SchedulerChoice:
    """One sampler: hcp name, diffusers class name, webui name, extra config options."""

    name: str
    diffusers_class: str
    webui_name: str
    options: Mapping[str, Any] = attrs.field(factory=dict)


#: hcp name -> sampler. webui's "PLMS" is PNDM without its Runge-Kutta warm-up steps.
SCHEDULERS: Dict[str, SchedulerChoice] = {
    c.name: c
    for c in (
        SchedulerChoice("ddim", "DDIMScheduler", "DDIM"),
        SchedulerChoice("ddpm", "DDPMScheduler", "DDPM"),
        SchedulerChoice("pndm", "PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
        SchedulerChoice("euler", "EulerDiscreteScheduler", "Euler"),
        SchedulerChoice("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
        SchedulerChoice("heun", "HeunDiscreteScheduler", "Heun"),
        SchedulerChoice("dpm++_2m", "DPMSolverMultistepScheduler", "DPM++ 2M"),
        SchedulerChoice("dpm++_2m_karras", "DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
        SchedulerChoice("unipc", "UniPCMultistepScheduler", "UniPC"),
    )
}


def scheduler_choice(name: str, where: Optional[str] = "--scheduler") -> SchedulerChoice:
    """The sampler called ``name``; an unknown name raises :class:`UnknownSchedulerError`
    (its message starts with ``where``, when given)."""
    choice = SCHEDULERS.get(name)
    if choice is None:
        prefix = f"{where}: " if where else ""
        raise UnknownSchedulerError(
            f"{prefix}unknown scheduler {name!r}.{did_you_mean(name, SCHEDULERS)} Known: {', '.join(SCHEDULERS)}."
        )
    return choice


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
