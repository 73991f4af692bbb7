"""Choose model layers by name, the way fine-tune and LoRA groups write them.

A pattern is either a module name from ``model.named_modules()`` (that module and everything
inside it) or ``re:`` followed by a regular expression tried with :func:`re.match` against every
module name (anchored at the start only, as in the original guide: ``'re:.*\\.attn.?$'``).

Modules that an adapter injected into the model (a LoRA branch inside its host layer, say) carry
the class attribute ``hcp_adapter_branch = True``; selection never looks inside them, so one
adapter's weights are never picked up by another adapter's groups.
"""
from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Dict, Iterator, List, Sequence, Tuple

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

REGEX_PREFIX = "re:"
#: Class attribute marking modules that adapters injected (selection skips them and their insides).
BRANCH_MARKER = "hcp_adapter_branch"


class LayerSelectionError(UserError):
    """A layer pattern that matches nothing, or a layer a group cannot use."""


def is_adapter_branch(module: "nn.Module") -> bool:
    """True for a module an adapter injected (see :data:`BRANCH_MARKER`)."""
    return bool(getattr(type(module), BRANCH_MARKER, False))


def model_modules(model: "nn.Module") -> Iterator[Tuple[str, "nn.Module"]]:
    """``named_modules()`` without adapter branches and anything inside them."""
    skip_prefix = None  # named_modules() is depth-first: a branch's insides follow it directly
    for name, module in model.named_modules():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        if is_adapter_branch(module):
            skip_prefix = name + "."
            continue
        skip_prefix = None
        yield name, module


def compile_pattern(pattern: str) -> "re.Pattern[str] | None":
    """The compiled regex of a ``re:`` pattern, None for a plain module name.

    Raises ValueError with the regex error for a bad expression (config validators call this).
    """
    if not pattern.startswith(REGEX_PREFIX):
        return None
    try:
        return re.compile(pattern[len(REGEX_PREFIX):])
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None


def _near_names(pattern: str, names: Sequence[str], n: int = 5) -> List[str]:
    """A few module names close to ``pattern`` for the error message.

    A plain name is compared whole. A regex rarely looks like a name, so its literal words are
    compared with the names' dotted parts: ``re:.*\\.atn2$`` suggests the modules ending in ``attn2``.
    """
    is_regex = pattern.startswith(REGEX_PREFIX)
    word = pattern[len(REGEX_PREFIX):] if is_regex else pattern
    whole = difflib.get_close_matches(word, names, n=n, cutoff=0.5)
    if whole and not is_regex:
        return whole
    parts = sorted({part for name in names for part in name.split(".")})
    for literal in sorted(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", word), key=len, reverse=True):
        for part in difflib.get_close_matches(literal, parts, n=3, cutoff=0.6):
            hits = [name for name in names if name == part or name.endswith("." + part)]
            if hits:
                return hits[:n]
    return whole or list(names[1 : n + 1])


def select_modules(model: "nn.Module", patterns: Sequence[str], *, what: str) -> Dict[str, "nn.Module"]:
    """The modules of ``model`` that ``patterns`` name, by name, in model order.

    ``what`` says where the patterns come from (``"lora_unet[0].layers"``) for messages. A
    pattern that matches nothing raises :class:`LayerSelectionError` naming it and a few near
    module names. Each returned module stands for itself *and everything inside it*; use
    :func:`expand_layers` to get the leaf layers.
    """
    modules = list(model_modules(model))
    names = [name for name, _ in modules]
    chosen: set[str] = set()
    for pattern in patterns:
        regex = compile_pattern(pattern)
        if regex is None:
            hits = [pattern] if pattern in set(names) else []
        else:
            hits = [name for name in names if regex.match(name)]
        if not hits:
            near = ", ".join(repr(n) for n in _near_names(pattern, names))
            kind = "regular expression" if regex is not None else "layer name"
            # Quoted as written (not repr), so a regex's backslashes read as in the config file.
            raise LayerSelectionError(
                f"{what}: {kind} '{pattern}' matches no module of the {type(model).__name__}. "
                f"Names are those of model.named_modules(); near ones: {near}."
            )
        chosen.update(hits)
    return {name: module for name, module in modules if name in chosen}


def expand_layers(
    model: "nn.Module",
    selected: Dict[str, "nn.Module"],
    *,
    what: str,
    types: Tuple[type, ...] | None = None,
) -> Dict[str, "nn.Module"]:
    """Leaf layers (``nn.Linear`` and ``nn.Conv2d`` by default) in or equal to ``selected``.

    A container expands to every such layer inside it, in model order. A selection that holds
    no layer of the wanted types is an error naming it.
    """
    from torch import nn

    types = types or (nn.Linear, nn.Conv2d)
    chosen = set(selected)
    out: Dict[str, "nn.Module"] = {}
    for name, module in model_modules(model):
        if isinstance(module, types) and any(s == "" or name == s or name.startswith(s + ".") for s in chosen):
            out[name] = module
    if not out:
        kinds = " or ".join(t.__name__ for t in types)
        raise LayerSelectionError(
            f"{what}: the selected modules ({', '.join(repr(n) for n in list(selected)[:5])}) hold no {kinds} layer."
        )
    return out


def select_layers(model: "nn.Module", patterns: Sequence[str], *, what: str) -> Dict[str, "nn.Module"]:
    """:func:`select_modules` then :func:`expand_layers`: the Linear/Conv2d layers ``patterns`` cover."""
    return expand_layers(model, select_modules(model, patterns, what=what), what=what)


def own_parameters(module: "nn.Module") -> List["torch.nn.Parameter"]:
    """Parameters of ``module`` and its children, leaving out those of adapter branches.

    Full fine-tune groups use this so that a container's LoRA weights are not trained twice.
    """
    params: List["torch.nn.Parameter"] = []
    seen: set[int] = set()
    for _, sub in model_modules(module):
        for p in sub.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
