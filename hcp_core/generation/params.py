"""What decides a generated image: :class:`GenerationParams`, and parsers for sizes and LoRA arguments.

Light on purpose (no torch): the config schema validates ``[sample]`` with :func:`parse_size`.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Tuple

import attrs

from ..interfaces import Size

#: Pixel sizes must be multiples of this (diffusers' SD pipelines require it).
SIZE_MULTIPLE = 8
#: Largest seed a torch.Generator takes.
MAX_SEED = 2**64 - 1
_SIZE_TEXT = re.compile(r"^\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*$")


def parse_size(value: Any) -> Size:
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


@attrs.frozen
class LoraSpec:
    """A LoRA file and the weight it is merged with."""

    path: str
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"


def parse_lora_spec(text: str) -> LoraSpec:
    """``FILE`` or ``FILE:WEIGHT``; a colon not followed by a number belongs to the path (``C:\\x``)."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return LoraSpec(path, float(tail))
        except ValueError:
            pass
    return LoraSpec(text, 1.0)


@attrs.frozen
class GenerationParams:
    """Everything that decides one image (given the device and precision it runs in).

    ``seed`` is this image's own seed. ``clip_skip`` counts as in hcp's config (0 = none, webui's
    "Clip skip: 1"). ``model`` is a path; ``loras`` are merged in order; custom words of later
    ``embeddings`` folders override earlier ones.
    """

    prompt: str
    seed: int
    model: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 7.0
    scheduler: str = "ddim"
    width: int = 512
    height: int = 512
    clip_skip: int = 0
    loras: Tuple[LoraSpec, ...] = attrs.field(default=(), converter=tuple)
    embeddings: Tuple[str, ...] = attrs.field(default=(), converter=tuple)
    prediction_type: Optional[str] = None

    def to_json(self) -> dict:
        """Plain data (for the PNG's ``hcp`` chunk)."""
        data = attrs.asdict(self, recurse=True)
        data["loras"] = [{"path": spec.path, "weight": spec.weight} for spec in self.loras]
        data["embeddings"] = list(self.embeddings)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "GenerationParams":
        """The inverse of :meth:`to_json`; keys it does not know are ignored."""
        known = {f.name for f in attrs.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = tuple(LoraSpec(str(spec["path"]), float(spec["weight"])) for spec in data.get("loras", ()))
        values["embeddings"] = tuple(str(e) for e in data.get("embeddings", ()))
        return cls(**values)
