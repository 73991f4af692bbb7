"""What decides a generated image: :class:`GenerationParams`, and parsers for sizes and LoRA arguments.

Light on purpose (no torch). :func:`parse_size` lives in :mod:`hcp_core.config.values` (the config
schema validates ``[sample]`` with it) and is re-exported here.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import attrs

from ..errors import UserError
from ..config.values import SIZE_MULTIPLE, parse_size  # noqa: F401  (moved to config)

#: Largest seed a torch.Generator takes.
MAX_SEED = 2**64 - 1


@attrs.frozen
class LoraSpec:
    """A LoRA file and the weight it is merged with."""

    path: str
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"


class LoraSpecError(UserError, ValueError):
    """A ``FILE:WEIGHT`` whose weight is not a number (a ValueError too, for argparse ``type=``)."""


def parse_lora_spec(text: str) -> LoraSpec:
    """``FILE`` or ``FILE:WEIGHT`` (the one parser of ``--lora`` for every command).

    The weight is what follows the last colon. A colon followed by a path (``C:\\x.safetensors``,
    ``/a/b:c.safetensors``: a separator or a dot) belongs to the path; anything else after the
    last colon must be a finite number.
    """
    path, sep, tail = text.rpartition(":")
    if not sep or not path:
        return LoraSpec(text, 1.0)
    try:
        weight = float(tail)
    except ValueError:
        if any(c in tail for c in "/\\."):
            return LoraSpec(text, 1.0)
        raise LoraSpecError(f"--lora {text!r}: the weight after ':' must be a number, like {path}:0.8") from None
    if not math.isfinite(weight):
        raise LoraSpecError(f"--lora {text!r}: the weight after ':' must be a finite number, like {path}:0.8")
    return LoraSpec(path, weight)


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
