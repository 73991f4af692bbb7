"""Parsers and tables for values a pipeline names: sizes, colours, ``{name}`` placeholders, samplers.

They live at the config level because the schema validates with them, and config is the lowest
layer of the core (config <- data <- models <- train/generation <- tools <- cli): data and
generation import these from here, never the reverse. Nothing heavy is imported at module level
(PIL only inside :func:`parse_colour`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import attrs

from ..errors import did_you_mean

# --------------------------------------------------------------------------- sizes
#: Pixel sizes must be multiples of this (the VAE downsamples by 8; diffusers' SD pipelines require it).
SIZE_MULTIPLE = 8
#: The longest side a configured image size (bucket, sample) may have; 8192 px is far beyond
#: what SD models are trained at, and bounds memory (one 8192x8192 latent batch is already huge).
MAX_SIDE = 8192
#: The largest configured image area in pixels (MAX_SIDE squared: 67,108,864).
MAX_AREA = MAX_SIDE * MAX_SIDE
_SIZE_TEXT = re.compile(r"^\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*$")


def parse_size(value: Any) -> Tuple[int, int]:
    """``(width, height)`` from ``"WxH"``, ``"N"`` (square), ``N`` or ``[W, H]``.

    Raises ValueError with a message that says what is accepted (callers add where it came from).
    """
    if isinstance(value, bool):
        numbers = None
    elif isinstance(value, int):
        numbers = (value, value)
    elif isinstance(value, str) and (m := _SIZE_TEXT.match(value)):
        numbers = (int(m.group(1)), int(m.group(2) or m.group(1)))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        numbers = (value[0], value[1])
    else:
        numbers = None
    if numbers is None:
        raise ValueError(f"{value!r} is not a size: write WIDTHxHEIGHT, e.g. \"512x768\" (or [512, 768])")
    width, height = numbers
    if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(f"size {width}x{height}: width and height must be positive multiples of {SIZE_MULTIPLE}")
    return width, height


# --------------------------------------------------------------------------- colours
RGB = Tuple[int, int, int]


def parse_colour(value: str) -> RGB:
    """``"white"``, ``"#808080"`` or ``"rgb(1,2,3)"`` as an (r, g, b) tuple; ValueError if unknown."""
    from PIL import ImageColor  # only when a colour is actually parsed: PIL is not light

    try:
        colour = ImageColor.getrgb(value)
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"unknown colour {value!r}: use a name like 'white' or a hex value like '#808080'") from exc
    return colour[:3]  # type: ignore[return-value]


# --------------------------------------------------------------------------- placeholders
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace each ``{name}`` whose name is in ``values``; others are left as they are."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def placeholders(text: str) -> List[str]:
    """Names of the ``{name}`` placeholders in ``text``, in order."""
    return PLACEHOLDER.findall(text)


# --------------------------------------------------------------------------- samplers
@attrs.frozen
class SchedulerChoice:
    """One sampler: hcp name, diffusers class name, webui name, extra config options.

    Plain data (the diffusers class is named, not imported): generation builds the sampler.
    """

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


def unknown_scheduler(name: str) -> Optional[str]:
    """None when ``name`` is a known sampler, else the message saying so (with a did-you-mean)."""
    if name in SCHEDULERS:
        return None
    return f"unknown scheduler {name!r}.{did_you_mean(name, SCHEDULERS)} Known: {', '.join(SCHEDULERS)}."
