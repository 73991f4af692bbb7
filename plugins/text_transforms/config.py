"""Config classes of the built-in text transforms (light: imported at registration)."""
from __future__ import annotations

from typing import Dict

import attrs

from hcp_core.config.validators import at_least, in_range, not_blank


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

    separator: str = attrs.field(default=",", validator=not_blank)
    keep_first: int = attrs.field(default=0, validator=at_least(0))


@attrs.define
class TagDropoutConfig:
    """Drop each tag of a comma-separated caption with probability p; keep_first tags are never dropped."""

    p: float = attrs.field(default=0.1, validator=in_range(0, 1))
    separator: str = attrs.field(default=",", validator=not_blank)
    keep_first: int = attrs.field(default=0, validator=at_least(0))


@attrs.define
class CaptionDropoutConfig:
    """Replace the whole prompt (template and caption) with "" with probability p, for unconditional training."""

    p: float = attrs.field(default=0.1, validator=in_range(0, 1))
