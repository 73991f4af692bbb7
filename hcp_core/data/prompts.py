"""From a template and a caption to the prompt string a sample is trained with.

A template holds ``{name}`` placeholders. Text transforms run first, in the listed order, on
:class:`~hcp_core.interfaces.PromptParts` (``template_fill`` fills words in the template,
``tag_shuffle``/``tag_dropout`` edit the caption). ``{caption}`` is filled last, so the order of
caption transforms and ``template_fill`` does not matter, and a caption's own braces are never
read as placeholders.
"""
from __future__ import annotations

import random
from typing import Iterable, Mapping, Sequence

import attrs

from ..config.values import PLACEHOLDER, fill_placeholders, placeholders  # noqa: F401  (moved to config)
from ..errors import ConfigError
from ..interfaces import ImageRecord, PromptParts

CAPTION = "caption"


@attrs.frozen
class TemplateFill:
    """Fills ``{word}`` placeholders from ``word_names``.

    A value may be a plain word ("sofa") or the name of a custom embedding ("my-cat"); the
    prompt-tuning adapter later expands an embedding name into its token positions.
    """

    word_names: Mapping[str, str] = attrs.field(converter=dict)

    def __call__(self, parts: PromptParts, rng: random.Random) -> PromptParts:
        return attrs.evolve(parts, template=fill_placeholders(parts.template, self.word_names))


def apply_transforms(parts: PromptParts, transforms: Iterable, rng: random.Random) -> PromptParts:
    """Run ``transforms`` in order."""
    for transform in transforms:
        parts = transform(parts, rng)
    return parts


def render(parts: PromptParts) -> str:
    """The final prompt: ``{caption}`` replaced by the caption (empty when there is none).

    With an empty caption, separators it leaves dangling ("a photo of sks, ") are trimmed.
    """
    text = fill_placeholders(parts.template, {CAPTION: parts.caption})
    return text.strip() if parts.caption else text.strip(" ,\t\n")


def build_prompt(record: ImageRecord, rng: random.Random) -> str:
    """A prompt for ``record``: a template picked from ``rng``, transformed, then rendered."""
    template = record.templates[0] if len(record.templates) == 1 else rng.choice(record.templates)
    parts = apply_transforms(PromptParts(template=template, caption=record.caption or ""), record.text_transforms, rng)
    return render(parts)


def check_templates(templates: Sequence[str], transforms: Sequence, where: str) -> None:
    """Raise :class:`ConfigError` if a template keeps a placeholder nothing fills.

    Each template is run once through ``transforms`` (with a fixed rng) and must come out with
    no ``{name}`` left except ``{caption}``.
    """
    for template in templates:
        parts = apply_transforms(PromptParts(template=template, caption=""), transforms, random.Random(0))
        left = [name for name in placeholders(parts.template) if name != CAPTION]
        if left:
            names = ", ".join(f"{{{n}}}" for n in dict.fromkeys(left))
            raise ConfigError(
                f"{where}: prompt template {template!r} has {names} but no word_names entry fills it; "
                f"add it to the source's word_names (e.g. word_names = {{ {left[0]} = \"my-word\" }}) "
                f"or to a template_fill text transform"
            )
