"""``tag_shuffle`` and ``tag_dropout``: edits of comma-separated (booru-style) captions."""
from __future__ import annotations

import random
from typing import List, Tuple

import attrs

from hcp_core.interfaces import PromptParts

from .config import TagDropoutConfig, TagShuffleConfig


def split_tags(caption: str, separator: str) -> List[str]:
    """The non-empty tags of ``caption``, stripped."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def join_tags(tags: List[str], separator: str) -> str:
    """Tags joined by ``separator`` and a space (", " for commas)."""
    return (separator.strip() + " ").join(tags)


def _split_kept(caption: str, separator: str, keep_first: int) -> Tuple[List[str], List[str]]:
    tags = split_tags(caption, separator)
    return tags[:keep_first], tags[keep_first:]


@attrs.frozen
class TagShuffle:
    """Shuffles the tags after the first ``keep_first``."""

    separator: str = ","
    keep_first: int = 0

    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts:
        kept, rest = _split_kept(parts.caption, self.separator, self.keep_first)
        rng.shuffle(rest)
        return attrs.evolve(parts, caption=join_tags(kept + rest, self.separator))


@attrs.frozen
class TagDropout:
    """Drops each tag after the first ``keep_first`` with probability ``p``."""

    p: float = 0.1
    separator: str = ","
    keep_first: int = 0

    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts:
        kept, rest = _split_kept(parts.caption, self.separator, self.keep_first)
        # One draw per tag, always, so the rng advances the same way whatever survives.
        survivors = [t for t in rest if rng.random() >= self.p]
        return attrs.evolve(parts, caption=join_tags(kept + survivors, self.separator))


def build_shuffle(config: TagShuffleConfig) -> TagShuffle:
    """``tag_shuffle`` factory."""
    return TagShuffle(separator=config.separator, keep_first=config.keep_first)


def build_dropout(config: TagDropoutConfig) -> TagDropout:
    """``tag_dropout`` factory."""
    return TagDropout(p=config.p, separator=config.separator, keep_first=config.keep_first)
