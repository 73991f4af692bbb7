"""Every hook spec is documented and tested; adding a hook without both fails here.

The parametrized tests below run for each ``hcp_*`` function in :mod:`hcp_core.hookspecs`, so a new
hook is exercised (by a temporary plugin implementing it) as soon as it exists, and must be given
a place in a pipeline (``USES``) and a section in CONTRIBUTING.md.
"""
from __future__ import annotations

import inspect
import re
import tomllib
import types
from pathlib import Path
from typing import Any, Callable, Dict

import attrs
import pytest

import core_components
from hcp_core import hookspecs, interfaces
from hcp_core.config import build_pipeline
from hcp_core.hookspecs import hookimpl
from hcp_core.plugins import build_registry
from hcp_core.registry import FAMILIES
from hcp_core.config.schema import Pipeline

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"
HOOKS = sorted(name for name, obj in vars(hookspecs).items() if name.startswith("hcp_") and inspect.isfunction(obj))


@attrs.define
class MetaConfig:
    """A component config with one field, to see it arrive in the pipeline."""

    value: int = 0


def _use_source(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["data"]["ds1"]["sources"].append({"type": name, "value": 3})
    return lambda p: p.data["ds1"].sources[-1]


def _use_bucket(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["data"]["ds1"]["bucket"] = {"type": name, "value": 3}
    return lambda p: p.data["ds1"].bucket


def _use_text_transform(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["data"]["ds1"]["sources"][0]["text_transforms"] = [{"type": name, "value": 3}]
    return lambda p: p.data["ds1"].sources[0].config.text_transforms[0]


def _use_adapter(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["meta_section"] = [{"value": 3}]
    return lambda p: p.adapters["meta_section"][0]


def _use_loss(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["train"] = {"loss": {"type": name, "value": 3}}
    return lambda p: p.train.loss


#: Where a pipeline uses a component of each family; returns how to find it in the result.
USES = {
    "hcp_register_data_sources": _use_source,
    "hcp_register_buckets": _use_bucket,
    "hcp_register_text_transforms": _use_text_transform,
    "hcp_register_adapters": _use_adapter,
    "hcp_register_losses": _use_loss,
}


def temporary_plugin(hook: str, component: str) -> types.ModuleType:
    """A plugin module implementing only ``hook``, registering ``component``."""

    @hookimpl
    def register(registry) -> None:
        extra = {"sections": {"meta_section": "unet"}} if registry.family == "adapters" else {}
        registry.add(component, config=MetaConfig, factory="test_hookspecs_meta:MetaConfig", **extra)

    plugin = types.ModuleType(f"meta_{hook}")
    setattr(plugin, hook, register)
    return plugin


def test_there_is_one_hook_per_family() -> None:
    assert HOOKS == sorted(f"hcp_register_{family}" for family in FAMILIES)
    assert sorted(USES) == HOOKS, "give each new hook a place in a pipeline in USES"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_is_a_register_hook_with_a_full_docstring(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    assert list(inspect.signature(spec).parameters) == ["registry"]
    doc = inspect.getdoc(spec) or ""
    assert doc, f"{hook} has no docstring"
    assert re.search(r"Factory: ``factory\(.+\) -> \w+``", doc), f"{hook}: docstring must give the factory's call signature"
    assert ".. versionadded::" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_temporary_plugin(hook: str) -> None:
    family = hook[len("hcp_register_"):]
    name = f"meta_{family}"
    registry = build_registry(extra_plugins=[core_components, temporary_plugin(hook, name)])
    comp = registry.families[family].get(name)
    assert (comp.plugin, comp.config, comp.doc) == (f"meta_{hook}", MetaConfig, MetaConfig.__doc__.strip())
    raw = tomllib.loads(core_components.MINIMAL_TOML)
    find = USES[hook](raw, name)
    used = find(build_pipeline(raw, registry))
    config = used if isinstance(used, MetaConfig) else used.config
    assert config == MetaConfig(value=3)
    if not isinstance(used, MetaConfig):
        assert used.name == name


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_in_contributing(hook: str) -> None:
    text = CONTRIBUTING.read_text(encoding="utf-8")
    assert f"def {hook}(registry" in text, f"CONTRIBUTING.md shows no implementation of {hook}"
    factory = re.search(r"Factory: ``(factory\(.+?\) -> \w+)``", inspect.getdoc(getattr(hookspecs, hook)), re.S)
    assert factory and " ".join(factory.group(1).split()) in text, f"CONTRIBUTING.md must give {hook}'s factory signature"


def test_every_runtime_interface_is_documented_in_contributing() -> None:
    text = CONTRIBUTING.read_text(encoding="utf-8")
    names = [n for n, obj in vars(interfaces).items() if inspect.isclass(obj) and obj.__module__ == interfaces.__name__]
    assert names
    missing = [n for n in names if not re.search(rf"`{n}[`(]", text)]
    assert not missing, f"CONTRIBUTING.md does not describe: {missing}"
