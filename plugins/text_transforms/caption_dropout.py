"""``caption_dropout``: the whole prompt becomes "" for a fraction of the samples.

It empties the template as well as the caption, so the sample trains the unconditional
prediction (what classifier-free guidance's empty prompt gives), as kohya's
``caption_dropout_rate`` does. The draw comes from the sample's generator (seeded with seed,
dataset, epoch and sample), so the same samples are dropped on every run and after a resume.
"""
from __future__ import annotations

import random

import attrs

from hcp_core.interfaces import PromptParts

from .config import CaptionDropoutConfig


@attrs.frozen
class CaptionDropout:
    """Empties template and caption with probability ``p``."""

    p: float = 0.1

    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts:
        # Always one draw, so later transforms see the same generator state whatever is dropped.
        if rng.random() < self.p:
            return attrs.evolve(parts, template="", caption="")
        return parts


def build(config: CaptionDropoutConfig) -> CaptionDropout:
    """``caption_dropout`` factory."""
    return CaptionDropout(p=config.p)
