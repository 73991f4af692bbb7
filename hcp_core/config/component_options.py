"""What ``hcp plugins -v`` prints under each component: its config keys, types and defaults.

Read from the component's attrs config class (the same class the config converter structures a
``{ type = "name", ... }`` table into), so the listing cannot drift from what a pipeline accepts.
"""
from __future__ import annotations

import typing
from typing import Any, List, Mapping

import attrs

from .convert import toml_keys
from .toml_write import dumps
from ..registry import Component

REQUIRED = "(required)"


def type_text(annotation: Any) -> str:
    """A field's annotation as people write it: ``int``, ``Optional[str]``, ``List[TextTransformSpec]``."""
    if isinstance(annotation, str):  # a module with ``from __future__ import annotations``
        return annotation
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_text(field: "attrs.Attribute") -> str:
    """The field's default in TOML notation; ``(required)`` when it has none, ``unset`` for None."""
    default = field.default
    if default is attrs.NOTHING:
        return REQUIRED
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if default.takes_self:  # computed from the other fields
            return "(computed)"
        default = default.factory()
    if default is None:
        return "unset"
    if isinstance(default, Mapping) and not default:
        return "{}"
    try:
        text = dumps({"v": default}).strip()
    except TypeError:  # a value TOML cannot write (an object): show it as Python does
        return repr(default)
    return text[len("v = "):] if text.startswith("v = ") else repr(default)


def option_lines(config: type, indent: str = "") -> List[str]:
    """``KEY  TYPE  = DEFAULT`` lines (aligned) for each key a TOML table of ``config`` takes."""
    if not attrs.has(config):
        return [f"{indent}(options are not an attrs class: {type_text(config)})"]
    fields = [f for f in attrs.fields(config) if f.init]
    keys = toml_keys(config)
    types = [type_text(f.type) for f in fields]
    key_width = max((len(k) for k in keys), default=0)
    type_width = max((len(t) for t in types), default=0)
    if not fields:
        return [f"{indent}(no options)"]
    return [f"{indent}{key:<{key_width}}  {kind:<{type_width}}  = {default_text(field)}"
            for key, kind, field in zip(keys, types, fields)]


def component_lines(component: Component, indent: str = "    ") -> List[str]:
    """The verbose block of one component: name and summary, adapter sections, then its options."""
    summary = summary_of(component.config)
    lines = [f"{indent}{component.name}" + (f": {summary}" if summary else "")]
    if component.sections:
        sections = ", ".join(f"{s} -> {t}" for s, t in component.sections.items())
        lines.append(f"{indent}  pipeline sections (a table or a list of tables) -> model part: {sections}; each takes:")
    lines += option_lines(component.config, indent + "  ")
    if component.options:
        table, options = component.options
        lines.append(f"{indent}  [{table}] table (once per run):")
        lines += option_lines(options, indent + "  ")
    return lines


def summary_of(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


__all__ = ["component_lines", "default_text", "option_lines", "type_text"]
