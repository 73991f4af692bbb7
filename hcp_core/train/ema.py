"""Exponential moving average of the trained weights."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch


class Ema:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every trained parameter."""

    def __init__(self, params: List[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"ema.{i}"])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the model (for exports)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)
