"""Config classes of the built-in text transforms (light: imported at registration)."""
from __future__ import annotations

from typing import Any, Dict

import attrs


def _probability(inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {value!r}", attribute)


def _not_negative(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value!r}", attribute)


def _not_empty(inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value.strip():
        raise ValueError("must not be empty or blank", attribute)


@attrs.define
class TemplateFillConfig:
    """Fill {word} placeholders of the prompt template: word_names = { pt1 = "my-cat", pt2 = "sofa" }.

    A value may be a plain word or the name of a custom embedding (prompt tuning). {caption} is
    always filled with the image's caption (empty when it has none).
    """

    word_names: Dict[str, str] = attrs.field(factory=dict)


@attrs.define
class TagShuffleConfig:
    """Shuffle the tags of a comma-separated caption; keep_first tags stay in front, in order."""

    separator: str = attrs.field(default=",", validator=_not_empty)
    keep_first: int = attrs.field(default=0, validator=_not_negative)


@attrs.define
class TagDropoutConfig:
    """Drop each tag of a comma-separated caption with probability p; keep_first tags are never dropped."""

    p: float = attrs.field(default=0.1, validator=_probability)
    separator: str = attrs.field(default=",", validator=_not_empty)
    keep_first: int = attrs.field(default=0, validator=_not_negative)
