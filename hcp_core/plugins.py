"""Find, load and call plugins; build the registry once per process.

Entry points in the ``hcp`` group are loaded one by one (never ``load_setuptools_entrypoints``,
which aborts on the first broken plugin). The built-ins are declared there too and are also
registered directly, so a source checkout without package metadata still works.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from typing import Iterable, Optional

import pluggy

from . import hookspecs
from .errors import PluginConflictError, did_you_mean
from .registry import FAMILIES, Registry

#: Comma-separated plugin (entry-point) names that are not loaded.
BLOCK_ENV = "HCP_BLOCK_PLUGINS"
#: The built-in plugins: entry-point name -> module. Mirrors pyproject.toml.
BUILTINS = {
    "data_sources": "hcp_plugins.data_sources",
    "buckets": "hcp_plugins.buckets",
    "text_transforms": "hcp_plugins.text_transforms",
    "adapters": "hcp_plugins.adapters",
    "losses": "hcp_plugins.losses",
}

_REGISTRY: Optional[Registry] = None


def blocked_plugins() -> set[str]:
    """Names listed in ``HCP_BLOCK_PLUGINS``."""
    return {n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()}


def _version(dist: Optional[str]) -> Optional[str]:
    if not dist:
        return None
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def make_plugin_manager(registry: Registry, extra_plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """Load built-ins, entry points and ``extra_plugins`` into a fresh manager.

    A plugin whose import fails is recorded in ``registry.failures`` and skipped.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = blocked_plugins()
    seen_modules: set[str] = set()

    def add(name: str, module_name: str, dist: Optional[str]) -> None:
        if name in blocked or module_name in seen_modules:
            return
        try:
            module = importlib.import_module(module_name)
            pm.register(module, name=name)
        except Exception as exc:  # a broken plugin must not take the others down
            registry.failures.append((name, dist, f"{type(exc).__name__}: {exc}"))
            return
        seen_modules.add(module_name)
        registry.plugins[name] = (dist, _version(dist), module_name)

    for ep in md.entry_points(group=hookspecs.PROJECT):
        dist = ep.dist.name if ep.dist is not None else None
        module_name = ep.value.partition(":")[0]
        add(ep.name, module_name, dist)
    for name, module_name in BUILTINS.items():  # a checkout without metadata still has them
        add(name, module_name, "hcp")
    _check_hook_names(pm, registry)
    for i, plugin in enumerate(extra_plugins):
        name = getattr(plugin, "__name__", f"extra{i}")
        if name not in blocked:
            pm.register(plugin, name=name)
            registry.plugins[name] = (None, None, name)
    return pm


def _check_hook_names(pm: pluggy.PluginManager, registry: Registry) -> None:
    """A misspelt hook (``hcp_register_bucket``) would be ignored silently: report it."""
    for name, plugin in pm.list_name_plugin():
        for attr in dir(plugin):
            if attr.startswith("hcp_") and not hasattr(hookspecs, attr) and callable(getattr(plugin, attr, None)):
                close = [h for h in dir(hookspecs) if h.startswith("hcp_register_")]
                dist = registry.plugins.get(name, (None,))[0]
                registry.failures.append(
                    (name, dist, f"unknown hook '{attr}'{did_you_mean(attr, close)} (it is never called)")
                )


def build_registry(extra_plugins: Iterable[object] = ()) -> Registry:
    """Run every plugin's register hooks, one plugin at a time, into a new :class:`Registry`."""
    registry = Registry()
    pm = make_plugin_manager(registry, extra_plugins)
    for family in FAMILIES:
        fam = registry.families[family]
        caller = getattr(pm.hook, f"hcp_register_{family}")
        # Call each implementation ourselves so every registration knows its owner; order of
        # registration never matters (pipeline order comes from the TOML).
        for impl in reversed(caller.get_hookimpls()):
            dist = registry.plugins.get(impl.plugin_name, (None,))[0]
            fam._owner = (impl.plugin_name, dist)
            try:
                impl.function(registry=fam)
            except PluginConflictError:
                raise
            except Exception as exc:  # a plugin that breaks while registering is reported, not fatal
                registry.failures.append((impl.plugin_name, dist, f"hcp_register_{family}: {type(exc).__name__}: {exc}"))
            finally:
                fam._owner = ("<direct>", None)
    return registry


def get_registry() -> Registry:
    """The process-wide registry, built on first use (hooks run at start-up only)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the cached registry (tests that install or block plugins call this)."""
    global _REGISTRY
    _REGISTRY = None


def report_failures(registry: Registry, stream=None) -> None:
    """Print one line per plugin that failed to load."""
    stream = stream or sys.stderr
    for name, dist, reason in registry.failures:
        print(f"hcp failed to load plugin '{name}' (from distribution {dist or 'unknown'}): {reason}", file=stream)
