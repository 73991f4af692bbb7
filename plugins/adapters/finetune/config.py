"""Config of a ``[[unet]]`` / ``[[text_encoder]]`` fine-tune group (light: no torch import)."""
from __future__ import annotations

from typing import List

import attrs

from hcp_core.config.validators import greater_than


def _non_empty(inst, attribute, value) -> None:
    if not value:
        raise ValueError("must name at least one layer (a module name or 're:' + regex)", attribute)


@attrs.define
class FinetuneGroup:
    """Train every parameter of the selected layers with learning rate ``lr``."""

    layers: List[str] = attrs.field(validator=_non_empty)
    lr: float = attrs.field(default=1e-6, validator=greater_than(0))
