"""``hcp layers MODEL [PATTERN]``: the module names that ``layers = [...]`` accepts, per model part.

The model is built on the ``meta`` device from its configs (the family's ``load_skeleton``: no
weight is read, so SDXL lists in seconds). Names are those layer selection matches against
(:func:`~hcp_core.models.layer_select.model_modules`), so any listed name pasted into a group's
``layers`` selects that module. Modules the family's default LoRA layers cover (what a LoRA group
without ``layers`` trains) are marked ``*``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Set, TextIO, Tuple

import attrs

from ..errors import UserError
from .layer_select import LayerSelectionError, compile_pattern, model_modules, select_modules

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..registry import Registry

DEFAULT_MARK = "*"


@attrs.frozen
class ModuleRow:
    """One listed module: its name as ``layers`` takes it, type, shape, and default-target mark."""

    name: str
    type: str
    shape: str
    default: bool


@attrs.frozen
class PartListing:
    """The listed modules of one model part, and the pipeline sections that target it."""

    part: str
    model_type: str
    sections: Tuple[str, ...]
    rows: Tuple[ModuleRow, ...]
    total: int  # modules of the part before PATTERN filtered them
    note: str = ""


def describe_shape(module: "nn.Module") -> str:
    """``Linear 320 -> 640``-style text: in/out features or channels and kernel, else the weight
    shape, else the parameter count of a container."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return f"{module.in_features} -> {module.out_features}"
    if isinstance(module, nn.Conv2d):
        kernel = "x".join(str(k) for k in module.kernel_size)
        groups = f", groups {module.groups}" if module.groups != 1 else ""
        return f"{module.in_channels} -> {module.out_channels}, kernel {kernel}{groups}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        return "weight " + "x".join(str(s) for s in weight.shape)
    count = sum(p.numel() for p in module.parameters())
    return f"{count:,} params" if count else "no params"


def default_targets(model: "nn.Module", patterns: Sequence[str]) -> Set[str]:
    """Names a LoRA group without ``layers`` covers: the modules the family's default patterns
    match (patterns that match nothing are skipped, as the LoRA adapter skips them) and every
    Linear/Conv2d (groups 1) inside them, the layers that get a LoRA."""
    from torch import nn

    matched: Set[str] = set()
    for pattern in patterns:
        try:
            matched.update(select_modules(model, [pattern], what="default layers"))
        except LayerSelectionError:
            continue
    out = set(matched)
    for name, module in model_modules(model):
        lora_host = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
        if lora_host and any(m == "" or name.startswith(m + ".") for m in matched):
            out.add(name)
    return out


def _filter(names: List[str], pattern: Optional[str]) -> Tuple[Set[str], str]:
    """Names PATTERN keeps, and a note on how it was read.

    PATTERN is read as ``layers`` reads it (a module name: that module and everything inside; ``re:``
    + a regex tried with ``re.match``: the matches and everything inside them), so the listing shows
    what the pattern would select. A plain word that is no module name filters by substring.
    """
    if pattern is None:
        return set(names), ""
    regex = compile_pattern(pattern)
    if regex is not None:
        hits = [n for n in names if regex.match(n)]
        how = f"modules {pattern!r} selects"
    elif pattern in names:
        hits, how = [pattern], f"modules {pattern!r} selects"
    else:
        sub = [n for n in names if pattern in n]
        return set(sub), f"no module is named {pattern!r}: names containing it"
    keep = {n for n in names if any(h == "" or n == h or n.startswith(h + ".") for h in hits)}
    return keep, how + " (each match and everything inside it)"


def list_part(model: "nn.Module", part: str, *, sections: Sequence[str] = (), defaults: Sequence[str] = (),
              pattern: Optional[str] = None, defaults_only: bool = False) -> PartListing:
    """The rows of one model part (``defaults``: the family's default LoRA patterns for it)."""
    modules = [(n, m) for n, m in model_modules(model) if n]  # "" (the whole part) is in the header
    names = [n for n, _ in modules]
    keep, note = _filter(names, pattern)
    marked = default_targets(model, defaults) if defaults else set()
    rows = tuple(
        ModuleRow(name, type(module).__name__, describe_shape(module), name in marked)
        for name, module in modules
        if name in keep and (not defaults_only or name in marked)
    )
    return PartListing(part, type(model).__name__, tuple(sections), rows, len(modules), note)


def list_model(pretrained: str, *, registry: "Registry", family: Optional[str] = None, config: Optional[str] = None,
               parts: Sequence[str] = (), pattern: Optional[str] = None, defaults_only: bool = False) -> List[PartListing]:
    """A listing per model part adapters may target (``parts`` narrows them), built without weights."""
    from .family import build_family, family_component

    if pattern is not None:
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise UserError(f"PATTERN: {exc}") from None
    component = family_component(pretrained, registry=registry, family=family, config=config)
    fam = build_family(component)
    models = fam.load_skeleton(str(pretrained), config=config)
    if models is None:
        raise UserError(f"{pretrained} is a single-file checkpoint: its modules are only known from a diffusers "
                        "folder of the same architecture; give it with --model-config DIR")
    available = [p for p in getattr(fam, "parts", ()) if getattr(models, p, None) is not None]
    unknown = [p for p in parts if p not in available]
    if unknown:
        raise UserError(f"--part {unknown[0]}: this {component.name} model has no such part; "
                        f"its parts are {', '.join(available)}")
    by_part: Dict[str, List[str]] = {}
    for section, (comp, target) in registry.adapter_sections().items():
        if attrs.has(comp.config) and "layers" in attrs.fields_dict(comp.config):  # not [tokenizer_pt]
            by_part.setdefault(target, []).append(section)
    default_layers = getattr(fam, "default_layers", None)
    out = []
    for part in parts or available:
        defaults = list(default_layers(part) or ()) if default_layers is not None else []
        out.append(list_part(models.part(part), part, sections=by_part.get(part, ()), defaults=defaults,
                             pattern=pattern, defaults_only=defaults_only))
    return out


def write_listing(listings: Sequence[PartListing], out: TextIO) -> None:
    """Print the listings: a header per part, then ``MARK NAME  TYPE  SHAPE`` aligned in columns."""
    for listing in listings:
        sections = ", ".join(f"[[{s}]]" for s in listing.sections) or "no pipeline section"
        print(f"{listing.part} ({listing.model_type}): {len(listing.rows)} of {listing.total} modules; "
              f"layers of {sections}; '' selects the whole {listing.part}", file=out)
        if listing.note:
            print(f"  showing {listing.note}", file=out)
        width = max((len(r.name) for r in listing.rows), default=0)
        type_width = max((len(r.type) for r in listing.rows), default=0)
        for row in listing.rows:
            mark = DEFAULT_MARK if row.default else " "
            print(f"  {mark} {row.name:<{width}}  {row.type:<{type_width}}  {row.shape}", file=out)
        print(file=out)
    print(f"{DEFAULT_MARK} = a default LoRA target (what a LoRA group without layers trains). A name selects that "
          "module and everything inside it; 're:' + a regex selects every name it matches from the start.", file=out)


__all__ = ["ModuleRow", "PartListing", "default_targets", "describe_shape", "list_model", "list_part", "write_listing"]
