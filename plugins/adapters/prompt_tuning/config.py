"""What the ``[tokenizer_pt]`` table holds (light: attrs only, imported at plugin discovery)."""
from __future__ import annotations

from typing import Any, List

import attrs

from hcp_core.config.validators import greater_than, not_blank


def _distinct_names(inst: Any, attribute: attrs.Attribute, value: List["TrainedWord"]) -> None:
    seen: set[str] = set()
    for word in value:
        if word.name.lower() in seen:
            raise ValueError(f"word '{word.name}' is listed twice; give each word one entry", attribute)
        seen.add(word.name.lower())


@attrs.define
class TrainedWord:
    """One trained custom word: ``{ name = "my-cat", lr = 0.003 }``; its own optimizer group."""

    name: str = attrs.field(validator=not_blank)
    lr: float = attrs.field(default=3e-3, validator=greater_than(0))


@attrs.define
class PromptTuningConfig:
    """Custom words from emb_dir, usable by name in prompts; train = [{ name, lr }] trains some of them."""

    #: Folder of custom-word files (.pt / .safetensors); relative to the working directory.
    emb_dir: str = attrs.field(default="embs", validator=not_blank)
    #: After training, write the trained vectors back into the words' files in emb_dir.
    replace: bool = False
    train: List[TrainedWord] = attrs.field(factory=list, validator=_distinct_names)
