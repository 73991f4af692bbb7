"""One layer's LoRA as files store it: the two factors and alpha (scale = alpha / rank), plus
DoRA's magnitude vector when the layer is weight-decomposed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .dora import dora_merged_delta
from .layer import delta_from_factors


@dataclass
class LoraWeights:
    """``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]) and ``alpha``; ``magnitude`` is DoRA's
    trained norm per output channel (``axis="output"``, shape (out,)) or, in files LyCORIS wrote
    with ``wd_on_output = False``, per input channel (``axis="input"``, shape (in * kh * kw,)...)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: Optional[torch.Tensor] = None
    axis: str = "output"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` shaped like the host weight, float32 (without DoRA's rescaling)."""
        return delta_from_factors(self.down, self.up, self.scale)

    def delta_for(self, base: torch.Tensor) -> torch.Tensor:
        """What merging adds to the host weight ``base``: :meth:`delta`, or for DoRA
        ``m * (W + dW) / ||W + dW|| - W``."""
        delta = self.delta().to(base.device)
        if self.magnitude is None:
            return delta
        return dora_merged_delta(base.float(), delta, self.magnitude.to(base.device), self.axis)


@dataclass
class ExportLayer:
    """One layer to write: model part, canonical module path (see naming) and its weights
    (:class:`LoraWeights`, or another adapter's weights with ``rank``, ``alpha`` and ``delta_for``)."""

    target: str
    path: str
    weights: Any
