"""The ``caption_prefix`` text transform."""
from __future__ import annotations

import random

import attrs

from hcp_core.interfaces import PromptParts

from .plugin import CaptionPrefixConfig


class CaptionPrefix:
    """Implements :class:`hcp_core.interfaces.TextTransform`; built by ``factory(config)``.

    A plain module-level class holding only its config, so DataLoader workers can pickle it.
    """

    def __init__(self, config: CaptionPrefixConfig) -> None:
        self.config = config

    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts:
        cfg = self.config
        # Draw from the rng only when the outcome is random, so p=1 leaves the sample stream alone.
        if cfg.probability < 1.0 and rng.random() >= cfg.probability:
            return parts
        caption = f"{cfg.text}{cfg.separator}{parts.caption}" if parts.caption else cfg.text
        return attrs.evolve(parts, caption=caption)
