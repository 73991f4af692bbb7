"""Config of a ``[[unet]]`` / ``[[text_encoder]]`` fine-tune group (light: no torch import)."""
from __future__ import annotations

from typing import List

import attrs


def _positive(inst, attribute, value) -> None:
    if value <= 0:
        raise ValueError(f"must be > 0, got {value!r}", attribute)


def _non_empty(inst, attribute, value) -> None:
    if not value:
        raise ValueError("must name at least one layer (a module name or 're:' + regex)", attribute)


@attrs.define
class FinetuneGroup:
    """Train every parameter of the selected layers with learning rate ``lr``."""

    layers: List[str] = attrs.field(validator=_non_empty)
    lr: float = attrs.field(default=1e-6, validator=_positive)
