"""The typed component registry that register-style hooks fill in.

A component is a name, a light attrs config class and a factory given as ``"module:attr"``; the
factory's module (which may import torch) is imported only when the component is built.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import attrs

from .errors import PluginConflictError, UnknownComponentError, did_you_mean

FAMILIES = ("data_sources", "buckets", "text_transforms", "adapters", "losses")
#: Singular words for messages ("unknown bucket 'x'").
FAMILY_NOUNS = {
    "data_sources": "data source",
    "buckets": "bucket",
    "text_transforms": "text transform",
    "adapters": "adapter",
    "losses": "loss",
}


@attrs.frozen
class Component:
    """One registered component: what a config's ``type = "name"`` refers to."""

    family: str
    name: str
    config: type
    factory: str
    plugin: str
    distribution: Optional[str] = None
    doc: str = ""
    #: Adapters only: top-level pipeline sections this adapter owns, mapped to the model part
    #: they target, e.g. ``{"lora_unet": "unet", "lora_text_encoder": "text_encoder"}``.
    sections: Mapping[str, str] = attrs.field(factory=dict)
    #: Adapters only: an optional run-wide options table, ``(section name, attrs config class)``,
    #: e.g. ``("lora", LoraOptions)`` for ``[lora]``; its structured value reaches the factory
    #: as ``options=`` (defaults when the table is absent).
    options: Optional[tuple[str, type]] = None

    def load(self) -> Callable[..., Any]:
        """Import and return the factory (the import happens here, not at registration)."""
        module_name, _, attr = self.factory.partition(":")
        module = importlib.import_module(module_name)
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def build(self, config: Any, **context: Any) -> Any:
        """Call the factory with the structured config and any context the caller provides."""
        return self.load()(config, **context)


class FamilyRegistry:
    """The components of one family; the object a ``hcp_register_<family>`` hook receives."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._components: Dict[str, Component] = {}
        # Set by the plugin manager while one plugin's hook runs, so duplicates name both owners.
        self._owner: tuple[str, Optional[str]] = ("<direct>", None)

    def add(
        self,
        name: str,
        *,
        config: type,
        factory: str,
        doc: Optional[str] = None,
        sections: Optional[Mapping[str, str]] = None,
        options: Optional[tuple[str, type]] = None,
    ) -> Component:
        """Register component ``name`` with its attrs ``config`` class and ``"module:attr"`` factory."""
        if not attrs.has(config):
            raise TypeError(f"{self.family} component '{name}': config must be an attrs class, got {config!r}")
        if ":" not in factory:
            raise TypeError(f"{self.family} component '{name}': factory must be 'module:attr', got {factory!r}")
        plugin, dist = self._owner
        if name in self._components:
            other = self._components[name]
            raise PluginConflictError(
                f"{FAMILY_NOUNS[self.family]} '{name}' is registered twice: by plugin '{other.plugin}'"
                f"{_from(other.distribution)} and by plugin '{plugin}'{_from(dist)}. "
                f"Uninstall one of them or block one with HCP_BLOCK_PLUGINS."
            )
        comp = Component(
            family=self.family,
            name=name,
            config=config,
            factory=factory,
            plugin=plugin,
            distribution=dist,
            doc=(doc if doc is not None else (config.__doc__ or "")).strip(),
            sections=dict(sections or {}),
            options=options,
        )
        self._components[name] = comp
        return comp

    def get(self, name: str) -> Component:
        """The component called ``name``; an unknown name lists what exists with a did-you-mean."""
        try:
            return self._components[name]
        except KeyError:
            pass
        known = ", ".join(sorted(self._components)) or "none"
        raise UnknownComponentError(
            f"unknown {FAMILY_NOUNS[self.family]} '{name}'.{did_you_mean(name, self._components)}"
            f" Known {self.family.replace('_', ' ')}: {known}."
        )

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._components.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        """Sorted names of every registered component."""
        return sorted(self._components)


def _from(dist: Optional[str]) -> str:
    return f" (from distribution {dist})" if dist else ""


class Registry:
    """All five families; built once at start-up by :func:`hcp_core.plugins.get_registry`."""

    def __init__(self) -> None:
        self.families: Dict[str, FamilyRegistry] = {f: FamilyRegistry(f) for f in FAMILIES}
        #: Plugins that failed to import: (plugin name, distribution, reason).
        self.failures: list[tuple[str, Optional[str], str]] = []
        #: Loaded plugins: name -> (distribution, version, module name).
        self.plugins: Dict[str, tuple[Optional[str], Optional[str], str]] = {}

    @property
    def data_sources(self) -> FamilyRegistry:
        return self.families["data_sources"]

    @property
    def buckets(self) -> FamilyRegistry:
        return self.families["buckets"]

    @property
    def text_transforms(self) -> FamilyRegistry:
        return self.families["text_transforms"]

    @property
    def adapters(self) -> FamilyRegistry:
        return self.families["adapters"]

    @property
    def losses(self) -> FamilyRegistry:
        return self.families["losses"]

    def adapter_options(self) -> Dict[str, Component]:
        """Options-table section name -> the adapter component that owns it."""
        return {comp.options[0]: comp for comp in self.adapters if comp.options}

    def adapter_sections(self) -> Dict[str, tuple[Component, str]]:
        """Top-level pipeline section -> (adapter component, target model part)."""
        out: Dict[str, tuple[Component, str]] = {}
        for comp in self.adapters:
            for section, target in comp.sections.items():
                if section in out:
                    raise PluginConflictError(
                        f"pipeline section '{section}' is claimed by adapter '{out[section][0].name}' "
                        f"(plugin '{out[section][0].plugin}') and adapter '{comp.name}' (plugin '{comp.plugin}')"
                    )
                out[section] = (comp, target)
        return out


@attrs.frozen
class ComponentSpec:
    """A component chosen in a config: the registered component plus its structured config."""

    component: Component
    config: Any

    @property
    def name(self) -> str:
        return self.component.name

    def build(self, **context: Any) -> Any:
        """Build the runtime object (imports the factory's module on first use)."""
        return self.component.build(self.config, **context)


# Field types for configs: which family a ``{ type = "...", ... }`` table is looked up in. The
# config converter (hcp_core.config.convert) structures them from the registry built at start-up.
@attrs.frozen
class SourceSpec(ComponentSpec):
    family = "data_sources"


@attrs.frozen
class BucketSpec(ComponentSpec):
    family = "buckets"


@attrs.frozen
class TextTransformSpec(ComponentSpec):
    family = "text_transforms"


@attrs.frozen
class LossSpec(ComponentSpec):
    family = "losses"
