"""The typed component registry that register-style hooks fill in.

A component is a name, a light attrs config class and a factory given as ``"module:attr"``; the
factory's module (which may import torch) is imported only when the component is built.

Components that ``HCP_BLOCK_PLUGINS`` blocks are kept aside (never built, never listed as known)
so that asking for one says which plugin provides it and that it is blocked.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional

import attrs

from .errors import PluginConflictError, UnknownComponentError, did_you_mean

FAMILIES = ("data_sources", "buckets", "text_transforms", "adapters", "losses", "models", "optimizers", "schedulers",
            "trackers")
#: Singular words for messages ("unknown bucket 'x'").
FAMILY_NOUNS = {
    "data_sources": "data source",
    "buckets": "bucket",
    "text_transforms": "text transform",
    "adapters": "adapter",
    "losses": "loss",
    "models": "model family",
    "optimizers": "optimizer",
    "schedulers": "lr scheduler",
    "trackers": "tracker",
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
    #: Adapters only: ``"module:attr"`` of a zero-argument factory returning an
    #: :class:`~hcp_core.interfaces.AdapterFiles` (which files this adapter reads, and how to merge
    #: one into a model). ``hcp generate --lora`` and ``hcp tools merge-lora`` find files through it.
    files: Optional[str] = None
    #: Model families only: the diffusers pipeline class names (``model_index.json``'s
    #: ``_class_name``) whose folders this family reads, and ``"single_file"`` if it reads a lone
    #: checkpoint file when ``model.family`` is not set.
    detect: tuple = ()
    #: The ``HCP_BLOCK_PLUGINS`` entry that blocks this component ("plugin" or "plugin:name"), or None.
    blocked_by: Optional[str] = None

    def load(self) -> Callable[..., Any]:
        """Import and return the factory (the import happens here, not at registration)."""
        return _import_attr(self.factory)

    def load_files(self) -> Any:
        """The adapter's :class:`~hcp_core.interfaces.AdapterFiles` (imports its module now), or None."""
        return _import_attr(self.files)() if self.files else None

    def build(self, config: Any, **context: Any) -> Any:
        """Call the factory with the structured config and any context the caller provides."""
        return self.load()(config, **context)


def _import_attr(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _check_ref(family: str, name: str, what: str, ref: str) -> None:
    if not isinstance(ref, str) or ":" not in ref:
        raise TypeError(f"{family} component '{name}': {what} must be 'module:attr', got {ref!r}")


class FamilyRegistry:
    """The components of one family; the object a ``hcp_register_<family>`` hook receives."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._components: Dict[str, Component] = {}
        #: Components registered but blocked by ``HCP_BLOCK_PLUGINS`` (by plugin or by name).
        self._blocked: Dict[str, Component] = {}
        # Set by the plugin manager while one plugin's hook runs, so duplicates name both owners.
        self._owner: tuple[str, Optional[str]] = ("<direct>", None)
        # Set by the plugin manager: the HCP_BLOCK_PLUGINS entry blocking (plugin, name), or None.
        self._is_blocked: Callable[[str, str], Optional[str]] = lambda plugin, name: None
        # Set by the plugin manager: the components of plugins blocked as a whole, found only
        # when a lookup fails (a blocked plugin is not imported at start-up).
        self._blocked_elsewhere: Callable[[], "FamilyRegistry | None"] = lambda: None

    def add(
        self,
        name: str,
        *,
        config: type,
        factory: str,
        doc: Optional[str] = None,
        sections: Optional[Mapping[str, str]] = None,
        options: Optional[tuple[str, type]] = None,
        files: Optional[str] = None,
        detect: tuple = (),
    ) -> Component:
        """Register component ``name`` with its attrs ``config`` class and ``"module:attr"`` factory.

        ``sections``, ``options`` and ``files`` are for adapters only, ``detect`` for model families
        only (see :class:`Component`).
        """
        if not attrs.has(config):
            raise TypeError(f"{self.family} component '{name}': config must be an attrs class, got {config!r}")
        _check_ref(self.family, name, "factory", factory)
        if (sections or options or files) and self.family != "adapters":
            raise TypeError(f"{self.family} component '{name}': sections, options and files are for adapters only")
        if files is not None:
            _check_ref(self.family, name, "files", files)
        if detect and self.family != "models":
            raise TypeError(f"{self.family} component '{name}': detect is for model families only")
        if isinstance(detect, str) or not all(isinstance(d, str) for d in detect):
            raise TypeError(f"model family '{name}': detect must be a tuple of pipeline class names, got {detect!r}")
        plugin, dist = self._owner
        entry = self._is_blocked(plugin, name)
        if entry:  # kept aside: never conflicts, never built
            comp = attrs.evolve(self._make(name, config, factory, doc, sections, options, files, tuple(detect)), blocked_by=entry)
            return self._blocked.setdefault(name, comp)
        if name in self._components:
            other = self._components[name]
            raise PluginConflictError(
                f"{FAMILY_NOUNS[self.family]} '{name}' is registered twice: by plugin '{other.plugin}'"
                f"{_from(other.distribution)} and by plugin '{plugin}'{_from(dist)}. "
                f"Uninstall one of them or block one with HCP_BLOCK_PLUGINS."
            )
        comp = self._make(name, config, factory, doc, sections, options, files, tuple(detect))
        self._components[name] = comp
        return comp

    def _make(self, name, config, factory, doc, sections, options, files, detect) -> Component:  # type: ignore[no-untyped-def]
        plugin, dist = self._owner
        return Component(
            family=self.family,
            name=name,
            config=config,
            factory=factory,
            plugin=plugin,
            distribution=dist,
            doc=(doc if doc is not None else (config.__doc__ or "")).strip(),
            sections=dict(sections or {}),
            options=options,
            files=files,
            detect=detect,
        )

    def get(self, name: str) -> Component:
        """The component called ``name``; an unknown name lists what exists with a did-you-mean,
        and a blocked one names the plugin that provides it."""
        try:
            return self._components[name]
        except KeyError:
            pass
        blocked = self.find_blocked(name)
        if blocked is not None:
            raise UnknownComponentError(f"{describe_blocked(blocked)}; remove that entry from HCP_BLOCK_PLUGINS to use it.")
        known = ", ".join(sorted(self._components)) or "none"
        raise UnknownComponentError(
            f"unknown {FAMILY_NOUNS[self.family]} '{name}'.{did_you_mean(name, self._components)}"
            f" Known {self.family.replace('_', ' ')}: {known}."
        )

    def blocked(self) -> List[Component]:
        """Components of loaded plugins that ``HCP_BLOCK_PLUGINS`` blocks by name, sorted."""
        return sorted(self._blocked.values(), key=lambda c: c.name)

    def find_blocked(self, name: str) -> Optional[Component]:
        """The blocked component called ``name`` (blocked by name, or of a blocked plugin), if any.

        Looking in blocked plugins imports them (their registration modules only); it happens
        only here, when a lookup has already failed.
        """
        if name in self._blocked:
            return self._blocked[name]
        elsewhere = self._blocked_elsewhere()
        if elsewhere is not None and name in elsewhere._blocked:
            return elsewhere._blocked[name]
        return None

    def all_blocked(self) -> List[Component]:
        """Every blocked component: blocked by name, and those of blocked plugins (imports them)."""
        elsewhere = self._blocked_elsewhere()
        more = elsewhere.blocked() if elsewhere is not None else []
        return self.blocked() + sorted(more, key=lambda c: (c.plugin, c.name))

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._components.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        """Sorted names of every registered component."""
        return sorted(self._components)


def _from(dist: Optional[str]) -> str:
    return f" (from distribution {dist})" if dist else ""


def describe_blocked(comp: Component) -> str:
    """``loss 'mse' is provided by plugin 'p', which is blocked by HCP_BLOCK_PLUGINS ('p')``."""
    noun, owner = FAMILY_NOUNS[comp.family], f"plugin '{comp.plugin}'{_from(comp.distribution)}"
    if comp.blocked_by == comp.plugin:
        return f"{noun} '{comp.name}' is provided by {owner}, which is blocked by HCP_BLOCK_PLUGINS ('{comp.plugin}')"
    return f"{noun} '{comp.name}' of {owner} is blocked by HCP_BLOCK_PLUGINS ('{comp.blocked_by}')"


class Registry:
    """Every family; built once at start-up by :func:`hcp_core.plugins.get_registry`."""

    def __init__(self) -> None:
        self.families: Dict[str, FamilyRegistry] = {f: FamilyRegistry(f) for f in FAMILIES}
        #: Plugins that failed to import: (plugin name, distribution, reason).
        self.failures: list[tuple[str, Optional[str], str]] = []
        #: Loaded plugins: name -> (distribution, version, module name).
        self.plugins: Dict[str, tuple[Optional[str], Optional[str], str]] = {}
        #: Plugins blocked by HCP_BLOCK_PLUGINS (not imported): name -> (distribution, module name).
        self.blocked_plugins: Dict[str, tuple[Optional[str], str]] = {}
        #: ``PLUGIN:COMPONENT`` entries of HCP_BLOCK_PLUGINS, as (plugin, component) pairs.
        self.blocked_components: set[tuple[str, str]] = set()

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

    @property
    def models(self) -> FamilyRegistry:
        return self.families["models"]

    @property
    def optimizers(self) -> FamilyRegistry:
        return self.families["optimizers"]

    @property
    def schedulers(self) -> FamilyRegistry:
        return self.families["schedulers"]

    @property
    def trackers(self) -> FamilyRegistry:
        return self.families["trackers"]

    def family_for(self, pipeline_class: str) -> Optional[Component]:
        """The model family that reads folders of ``pipeline_class`` (or ``"single_file"``), or None."""
        found = [comp for comp in self.models if pipeline_class in comp.detect]
        if len(found) > 1:
            raise PluginConflictError(
                f"model families '{found[0].name}' (plugin '{found[0].plugin}') and '{found[1].name}' (plugin "
                f"'{found[1].plugin}') both read {pipeline_class}; set model.family to choose one"
            )
        return found[0] if found else None

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

    def blocked_adapter_section(self, section: str) -> Optional[Component]:
        """The blocked adapter that would own pipeline ``section``, for messages (imports blocked plugins)."""
        return next((c for c in self.adapters.all_blocked() if section in c.sections), None)

    def file_adapters(self) -> List[Component]:
        """Adapters that declared file capabilities (``files=`` on registration), by name."""
        return [comp for comp in self.adapters if comp.files]


@attrs.frozen
class ComponentSpec:
    """A component chosen in a config: the registered component plus its structured config."""

    component: Component
    config: Any
    #: The component a table without ``type`` means (``[train.optimizer]`` with options only).
    default_type: ClassVar[Optional[str]] = None
    #: Whether a bare name stands for ``{ type = "name" }`` (``train.optimizer = "prodigy"``).
    by_name: ClassVar[bool] = False

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


@attrs.frozen
class ModelFamilySpec(ComponentSpec):
    family = "models"


@attrs.frozen
class OptimizerSpec(ComponentSpec):
    family = "optimizers"
    default_type = "adamw"
    by_name = True


@attrs.frozen
class SchedulerSpec(ComponentSpec):
    family = "schedulers"
    default_type = "constant"
    by_name = True


@attrs.frozen
class TrackerSpec(ComponentSpec):
    family = "trackers"
    by_name = True
