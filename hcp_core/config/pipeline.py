"""From merged TOML to a validated :class:`~hcp_core.config.schema.Pipeline`, and back."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import attrs

from ..errors import ConfigError, did_you_mean
from ..plugins import get_registry
from ..registry import Registry, describe_blocked
from . import convert
from .loader import load_raw
from .schema import Pipeline

#: Pipeline fields that come from TOML; the rest are filled by hcp.
_TOML_FIELDS = ("model", "data", "seed", "exp_dir", "train", "sample", "output_name", "validation")
#: The loss a pipeline without ``train.loss`` uses, looked up in the registry like any other
#: (so a plugin may replace it, and blocking it is reported as for any component).
DEFAULT_LOSS = "mse"


def build_pipeline(raw: Mapping[str, Any], registry: Optional[Registry] = None, base_dir: str = ".") -> Pipeline:
    """Validate merged TOML data against the schema and the registered adapters.

    All problems are reported together in one :class:`ConfigError`.
    """
    registry = registry or get_registry()
    conv = convert.make_converter(registry)
    sections = registry.adapter_sections()
    option_tables = registry.adapter_options()
    core = {k: v for k, v in raw.items() if k in _TOML_FIELDS}
    errors: List[str] = []
    if isinstance(core.get("model"), Mapping):
        core["model"] = _with_family(core["model"], registry, base_dir, errors)
    train = core.get("train", {})
    if isinstance(train, Mapping):  # an empty table is the component's default_type (OptimizerSpec...)
        core["train"] = {"loss": {"type": DEFAULT_LOSS}, "optimizer": {}, "scheduler": {}, **train}
    for key in raw:
        if key not in _TOML_FIELDS and key not in sections and key not in option_tables:
            blocked = registry.blocked_adapter_section(key)
            if blocked is not None:
                errors.append(f"{key}: {describe_blocked(blocked)} (that adapter owns this section).")
                continue
            known = [*_TOML_FIELDS, *sorted(sections), *sorted(option_tables)]
            errors.append(f"{key}: unknown section.{did_you_mean(key, known)} Known: {', '.join(known)}.")
    for required in ("model", "data"):
        if required not in raw:
            errors.append(f"{required}: required section missing")
    pipeline: Optional[Pipeline] = None
    if "model" in raw and "data" in raw:  # checked even when other sections are wrong: report all at once
        try:
            pipeline = convert.structure(conv, {**core}, Pipeline)
        except ConfigError as exc:
            errors.extend(_lines(exc))
    adapters: Dict[str, List[Any]] = {}
    for section, (comp, _target) in sections.items():
        if section not in raw:
            continue
        value = raw[section]
        items = [value] if isinstance(value, Mapping) else value
        if not isinstance(items, list):
            errors.append(f"{section}: expected a table or a list of tables, got {value!r}")
            continue
        try:
            adapters[section] = [
                convert.structure(conv, item, comp.config, f"{section}[{i}]" if isinstance(value, list) else section)
                for i, item in enumerate(items)
            ]
        except ConfigError as exc:
            errors.extend(_lines(exc))
    options: Dict[str, Any] = {}
    for section, comp in option_tables.items():
        try:
            options[section] = convert.structure(conv, raw.get(section, {}), comp.options[1], section)
        except ConfigError as exc:
            errors.extend(_lines(exc))
    if errors:
        if registry.failures:  # their components are missing from every "Known:" list above
            broken = "; ".join(f"{name} ({reason})" for name, _dist, reason in registry.failures)
            errors.append(f"note: {len(registry.failures)} plugin(s) failed to load, so their components are unknown: "
                          f"{broken}; `hcp plugins` lists what loaded")
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    assert pipeline is not None
    if not pipeline.data:
        raise ConfigError("data: define at least one dataset, e.g. [data.dataset1] with sources and a bucket")
    return attrs.evolve(pipeline, adapters=adapters, adapter_options=options, base_dir=str(base_dir), raw=dict(raw),
                         registry=registry)


def detect_family(registry: Registry, pretrained: str, config: Optional[str], base_dir: str) -> Optional[str]:
    """The family that reads the model at ``pretrained``: by its folder's (or ``config``'s)
    ``model_index.json`` class, or the ``single_file`` family for a lone file. None when the path
    does not exist (the run reports that); ConfigError when no family reads it."""
    path = os.path.join(base_dir, os.path.expanduser(pretrained))
    folder = path if os.path.isdir(path) else (os.path.join(base_dir, config) if config else None)
    if folder is not None and os.path.isfile(os.path.join(folder, "model_index.json")):
        try:
            with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as fh:
                cls = str(json.load(fh).get("_class_name", ""))
        except (OSError, ValueError, AttributeError):
            return None  # the loader names the damaged file
        comp = registry.family_for(cls)
        if comp is None:
            known = ", ".join(f"{c.name} ({', '.join(d for d in c.detect if d != 'single_file')})" for c in registry.models)
            raise ConfigError(f"model.family: no installed model family reads {cls} folders ({folder}); "
                              f"set model.family or install its plugin. Known: {known or 'none'}.")
        return comp.name
    if os.path.isfile(path):
        comp = registry.family_for("single_file")
        return comp.name if comp is not None else None
    return None


def _with_family(model: Mapping[str, Any], registry: Registry, base_dir: str, errors: List[str]) -> Dict[str, Any]:
    """``model`` with ``family`` as a ``{type = ...}`` table: a bare name wrapped, a missing one detected."""
    out = dict(model)
    family = out.get("family")
    if isinstance(family, str):
        out["family"] = {"type": family}
    elif family is None and isinstance(out.get("pretrained"), str):
        try:
            name = detect_family(registry, out["pretrained"], out.get("config") if isinstance(out.get("config"), str) else None,
                                 str(base_dir))
        except ConfigError as exc:
            errors.append(str(exc))
            name = None
        if name is not None:
            out["family"] = {"type": name}
    return out


def _lines(exc: ConfigError) -> List[str]:
    text = str(exc)
    head = "invalid config:\n  "
    return text[len(head):].split("\n  ") if text.startswith(head) else [text]


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), registry: Optional[Registry] = None) -> Pipeline:
    """Load, merge (bases, overrides) and validate a pipeline file.

    Relative paths inside the pipeline (model, data, exp_dir) are resolved against the current
    working directory, as in the original tool; ``base`` paths against the file naming them.
    """
    raw = load_raw(path, overrides)
    return build_pipeline(raw, registry, base_dir=os.getcwd())


def pipeline_to_dict(pipeline: Pipeline, registry: Optional[Registry] = None) -> Dict[str, Any]:
    """The resolved pipeline (defaults filled in) as plain data, ready for TOML."""
    registry = registry or pipeline.registry or get_registry()
    conv = convert.make_converter(registry)
    owners = registry.adapter_options()
    out: Dict[str, Any] = {}
    for name in _TOML_FIELDS:
        value = getattr(pipeline, name)
        if value is not None:
            out[name] = convert.unstructure(conv, value)
    for section, items in pipeline.adapters.items():
        out[section] = [convert.unstructure(conv, item) for item in items]
    for section, value in pipeline.adapter_options.items():
        in_use = any(name in pipeline.adapters for name in owners[section].sections)
        if section in pipeline.raw or in_use:
            out[section] = convert.unstructure(conv, value)
    return _drop_none(out)


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value if v is not None]
    return value
