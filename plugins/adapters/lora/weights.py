"""One layer's LoRA as files store it: the two factors and alpha (scale = alpha / rank)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer import delta_from_factors


@dataclass
class LoraWeights:
    """``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]) and ``alpha``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` shaped like the host weight, float32."""
        return delta_from_factors(self.down, self.up, self.scale)


@dataclass
class ExportLayer:
    """One layer to write: model part, canonical module path (see naming) and its weights."""

    target: str
    path: str
    weights: LoraWeights
