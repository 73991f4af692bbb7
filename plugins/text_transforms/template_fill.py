"""``template_fill``: words for the template's ``{word}`` placeholders."""
from __future__ import annotations

from hcp_core.data.prompts import TemplateFill

from .config import TemplateFillConfig


def build(config: TemplateFillConfig) -> TemplateFill:
    """The transform for ``config`` (the same class a source's own ``word_names`` uses)."""
    return TemplateFill(config.word_names)
