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


def _use_model_family(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["model"]["family"] = {"type": name, "value": 3}
    return lambda p: p.model.family


def _use_optimizer(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["train"] = {"optimizer": {"type": name, "value": 3}}
    return lambda p: p.train.optimizer


def _use_scheduler(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["train"] = {"scheduler": {"type": name, "value": 3}}
    return lambda p: p.train.scheduler


def _use_tracker(raw: Dict[str, Any], name: str) -> Callable[[Pipeline], Any]:
    raw["train"] = {"trackers": [{"type": name, "value": 3}]}
    return lambda p: p.train.trackers[0]


#: Where a pipeline uses a component of each family; returns how to find it in the result.
USES = {
    "hcp_register_data_sources": _use_source,
    "hcp_register_buckets": _use_bucket,
    "hcp_register_text_transforms": _use_text_transform,
    "hcp_register_adapters": _use_adapter,
    "hcp_register_losses": _use_loss,
    "hcp_register_models": _use_model_family,
    "hcp_register_optimizers": _use_optimizer,
    "hcp_register_schedulers": _use_scheduler,
    "hcp_register_trackers": _use_tracker,
}

#: What the temporary plugin passes to ``registry.add`` besides name, config and factory.
EXTRA_ARGUMENTS = {
    "adapters": {"sections": {"meta_section": "unet"}},
    "models": {"detect": ("MetaPipeline",)},
}


def temporary_plugin(hook: str, component: str) -> types.ModuleType:
    """A plugin module implementing only ``hook``, registering ``component``."""

    @hookimpl
    def register(registry) -> None:
        registry.add(component, config=MetaConfig, factory="test_hookspecs_meta:MetaConfig",
                     **EXTRA_ARGUMENTS.get(registry.family, {}))

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


def test_every_argument_of_registry_add_is_documented_in_contributing() -> None:
    from hcp_core.registry import FamilyRegistry

    text = CONTRIBUTING.read_text(encoding="utf-8")
    arguments = [p for p in inspect.signature(FamilyRegistry.add).parameters if p != "self"]
    missing = [a for a in arguments if not re.search(rf"^\| `{a}` +\|", text, re.M)]
    assert not missing, f"CONTRIBUTING.md's registry.add table lacks: {missing}"
    params = inspect.signature(FamilyRegistry.add).parameters
    shown = ", ".join(a if params[a].default is inspect.Parameter.empty else f"{a}={params[a].default!r}" for a in arguments[1:])
    assert f"registry.add(name, *, {shown})" in text


def test_model_family_detection_is_exercised_by_a_temporary_plugin(tmp_path: Path) -> None:
    """``detect=`` reaches the component; a folder whose ``model_index.json`` names one of its
    pipeline classes picks the family when ``model.family`` is left out; a bare name is a table."""
    registry = build_registry(extra_plugins=[core_components, temporary_plugin("hcp_register_models", "meta_models")])
    comp = registry.models.get("meta_models")
    assert comp.detect == ("MetaPipeline",) and registry.family_for("MetaPipeline") is comp
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "model_index.json").write_text('{"_class_name": "MetaPipeline"}')
    raw = tomllib.loads(core_components.MINIMAL_TOML)
    detected = build_pipeline(raw, registry, base_dir=str(tmp_path)).model.family
    assert (detected.name, detected.config) == ("meta_models", MetaConfig())
    raw["model"]["family"] = "meta_models"
    named = build_pipeline(raw, registry, base_dir=str(tmp_path / "elsewhere")).model.family
    assert (named.name, named.config) == ("meta_models", MetaConfig())
    with pytest.raises(TypeError, match="detect is for model families only"):
        registry.losses.add("meta_detect", config=MetaConfig, factory="test_hookspecs_meta:MetaConfig", detect=("X",))


def test_model_family_members_are_documented_in_contributing() -> None:
    """Every member of the ModelFamily protocol, the optional ``size_multiple`` and ``default_layers``
    (which the run reads when present, the latter into ``AdapterContext``) and every TrainingPrediction
    field are described in the Model families section."""
    text = CONTRIBUTING.read_text(encoding="utf-8")
    section = text.split("### Model families", 1)[1].split("\n## ", 1)[0]
    members = [n for n in vars(interfaces.ModelFamily) if not n.startswith("_")]
    members += list(interfaces.ModelFamily.__annotations__)
    assert {"parts", "load", "load_skeleton", "latent_factor", "prompt_encoder", "training_prediction", "render"} <= set(members)
    missing = [m for m in members if f"`{m}" not in section]
    assert not missing, f"CONTRIBUTING.md's Model families section does not describe {missing}"
    assert "optional `size_multiple" in section
    assert "optional `default_layers" in section and "default_layers(part)" in (interfaces.ModelFamily.__doc__ or "")
    assert "`default_layers`" in text.split("- `AdapterContext`:", 1)[1].split("\n- ", 1)[0]
    fields = [f.name for f in attrs.fields(interfaces.TrainingPrediction)]
    assert not [f for f in fields if f"`{f}`" not in section], "describe every TrainingPrediction field"


def test_optional_adapter_members_are_documented_in_contributing() -> None:
    """The Adapter protocol's docstring names its optional members; CONTRIBUTING.md describes each."""
    text = CONTRIBUTING.read_text(encoding="utf-8")
    optional = re.findall(r"``(\w+)", (inspect.getdoc(interfaces.Adapter) or "").split("Optional members:")[1])
    assert {"attach_order", "wrap_prompt_encoder"} <= set(optional)
    missing = [m for m in optional if m in ("attach_order", "wrap_prompt_encoder") and f"optional `{m}" not in text]
    assert not missing, f"CONTRIBUTING.md does not describe the optional adapter members {missing}"


def test_adapter_file_capabilities_are_exercised_by_a_temporary_plugin(tmp_path) -> None:
    """``files=`` reaches the component and ``hcp_core.adapter_files`` finds the adapter through it."""
    from safetensors.torch import save_file
    import torch

    from hcp_core.adapter_files import find_file_adapter

    @hookimpl
    def register(registry) -> None:
        registry.add("meta_files", config=MetaConfig, factory="test_hookspecs_meta:MetaConfig",
                     sections={"meta_section": "unet"}, files="test_hookspecs_meta:MetaFiles")  # fmt: skip

    plugin = types.ModuleType("meta_files_plugin")
    plugin.hcp_register_adapters = register
    registry = build_registry(extra_plugins=[plugin])
    assert registry.adapters.get("meta_files").files == "test_hookspecs_meta:MetaFiles"
    save_file({"meta.weight": torch.zeros(1)}, str(tmp_path / "m.safetensors"))
    found = find_file_adapter(registry, tmp_path / "m.safetensors")
    assert found.component.name == "meta_files" and found.apply({}, str(tmp_path / "m.safetensors"), 2.0) == 2


class MetaFiles:
    """Reads files whose tensors are all called ``meta.*``; 'applies' by returning twice the weight."""

    def reads(self, header: interfaces.FileHeader) -> bool:
        return bool(header.keys) and all(k.startswith("meta.") for k in header.keys)

    def apply(self, models: Any, path: str, weight: float) -> int:
        return int(weight)
