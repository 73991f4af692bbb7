"""Find, load and call plugins; build the registry once per process.

Every plugin, the built-in ones included, is found through the ``hcp`` entry-point group (the
built-ins are declared in hcp's own ``pyproject.toml``; ``pip install -e .`` registers them as well
as a normal install). Entry points are loaded one by one (never ``load_setuptools_entrypoints``,
which aborts on the first broken plugin).

``HCP_BLOCK_PLUGINS`` is a comma-separated list of entries: ``PLUGIN`` blocks a whole plugin (its
module is not even imported), ``PLUGIN:COMPONENT`` blocks one component of a plugin (in whatever
family it registers it), e.g. ``HCP_BLOCK_PLUGINS=adapters,losses:mse``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import os
import sys
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import attrs
import pluggy

from . import hookspecs
from .errors import PluginConflictError, did_you_mean
from .registry import FAMILIES, Component, FamilyRegistry, Registry

#: Comma-separated ``PLUGIN`` or ``PLUGIN:COMPONENT`` entries that are not loaded.
BLOCK_ENV = "HCP_BLOCK_PLUGINS"

_REGISTRY: Optional[Registry] = None


@attrs.frozen
class BlockList:
    """What ``HCP_BLOCK_PLUGINS`` blocks: whole plugins, and single components of a plugin."""

    plugins: frozenset = frozenset()  # plugin names
    components: frozenset = frozenset()  # (plugin name, component name)

    def entry_for(self, plugin: str, component: str) -> Optional[str]:
        """The entry that blocks ``component`` of ``plugin`` (``"p"`` or ``"p:c"``), or None."""
        if plugin in self.plugins:
            return plugin
        if (plugin, component) in self.components:
            return f"{plugin}:{component}"
        return None


def parse_block_list(text: str) -> BlockList:
    """``"adapters, losses:mse"`` -> plugins {adapters}, components {(losses, mse)}."""
    plugins, components = set(), set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        plugin, sep, component = (part.strip() for part in entry.partition(":"))
        if sep and component:
            components.add((plugin, component))
        else:
            plugins.add(plugin)
    return BlockList(frozenset(plugins), frozenset(components))


def block_list() -> BlockList:
    """What ``HCP_BLOCK_PLUGINS`` blocks now."""
    return parse_block_list(os.environ.get(BLOCK_ENV, ""))


def blocked_plugins() -> set[str]:
    """Names of the plugins ``HCP_BLOCK_PLUGINS`` blocks as a whole."""
    return set(block_list().plugins)


def _version(dist: Optional[str]) -> Optional[str]:
    if not dist:
        return None
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


#: A plugin to load: (name, module name or plugin object, distribution).
_Candidate = Tuple[str, Any, Optional[str]]


def _candidates(extra_plugins: Iterable[object]) -> List[_Candidate]:
    """Installed entry points, then ``extra_plugins`` (named by their ``__name__``)."""
    out: List[_Candidate] = []
    for ep in md.entry_points(group=hookspecs.PROJECT):
        out.append((ep.name, ep.value.partition(":")[0], ep.dist.name if ep.dist is not None else None))
    for i, plugin in enumerate(extra_plugins):
        out.append((getattr(plugin, "__name__", f"extra{i}"), plugin, None))
    return out


def make_plugin_manager(
    registry: Registry, extra_plugins: Iterable[object] = (), blocks: Optional[BlockList] = None
) -> pluggy.PluginManager:
    """Load installed entry points and ``extra_plugins`` into a fresh manager.

    A plugin whose import fails is recorded in ``registry.failures`` and skipped. A plugin module
    reached twice (two entry points, or an installed plugin also passed in ``extra_plugins``) is
    registered once, under its first name. Blocked plugins are noted in
    ``registry.blocked_plugins`` and not imported.
    """
    blocks = block_list() if blocks is None else blocks
    pm = _new_manager()
    blocked: List[_Candidate] = []
    for name, target, dist in _candidates(extra_plugins):
        if name in blocks.plugins:
            blocked.append((name, target, dist))
            registry.blocked_plugins.setdefault(name, (dist, _module_name(target)))
            continue
        _register(pm, registry, name, target, dist)
    _check_hook_names(pm, registry)
    _set_block_hooks(registry, blocks, blocked)
    registry.blocked_components = set(blocks.components)
    return pm


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _module_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _register(pm: pluggy.PluginManager, registry: Optional[Registry], name: str, target: Any, dist: Optional[str]) -> bool:
    """Import (for a module name) and register one plugin; a failure is recorded, not raised."""
    try:
        plugin = importlib.import_module(target) if isinstance(target, str) else target
        if pm.is_registered(plugin):
            return False  # already there through another entry point (or installed and passed as extra)
        pm.register(plugin, name=name)
    except Exception as exc:  # a broken plugin must not take the others down
        if registry is not None:
            registry.failures.append((name, dist, f"{type(exc).__name__}: {exc}"))
        return False
    if registry is not None:
        registry.plugins[name] = (dist, _version(dist), _module_name(target))
    return True


def _check_hook_names(pm: pluggy.PluginManager, registry: Registry) -> None:
    """A misspelt hook (``hcp_register_bucket``) would be ignored silently: report it."""
    close = [h for h in dir(hookspecs) if h.startswith("hcp_register_")]
    for name, plugin in pm.list_name_plugin():
        for attr in dir(plugin):
            if attr.startswith("hcp_") and not hasattr(hookspecs, attr) and callable(getattr(plugin, attr, None)):
                dist = registry.plugins.get(name, (None,))[0]
                registry.failures.append(
                    (name, dist, f"unknown hook '{attr}'.{did_you_mean(attr, close)} (it is never called)")
                )


def _set_block_hooks(registry: Registry, blocks: BlockList, blocked: List[_Candidate]) -> None:
    """Keep components blocked by name aside; find those of blocked plugins only on demand."""
    shadow: List[Optional[Registry]] = []

    def blocked_registry() -> Optional[Registry]:
        # Built on first use: importing a blocked plugin is what blocking avoids at start-up, so
        # it happens only to explain a failed lookup; anything it breaks is ignored.
        if not shadow:
            shadow.append(_blocked_registry(blocked) if blocked else None)
        return shadow[0]

    for family, fam in registry.families.items():
        fam._is_blocked = blocks.entry_for
        fam._blocked_elsewhere = _family_of(blocked_registry, family)


def _family_of(get: Callable[[], Optional[Registry]], family: str) -> Callable[[], Optional[FamilyRegistry]]:
    def find() -> Optional[FamilyRegistry]:
        reg = get()
        return reg.families[family] if reg is not None else None

    return find


def _blocked_registry(blocked: List[_Candidate]) -> Registry:
    """The components of the blocked plugins, every one kept aside as blocked by its plugin."""
    registry = Registry()
    pm = _new_manager()
    for name, target, dist in blocked:
        if _register(pm, None, name, target, dist):
            registry.plugins[name] = (dist, None, _module_name(target))
    for fam in registry.families.values():
        fam._is_blocked = lambda plugin, name: plugin
    _run_register_hooks(pm, registry, quiet=True)
    return registry


def _run_register_hooks(pm: pluggy.PluginManager, registry: Registry, *, quiet: bool = False) -> None:
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
                if not quiet:
                    raise
            except Exception as exc:  # a plugin that breaks while registering is reported, not fatal
                if not quiet:
                    registry.failures.append((impl.plugin_name, dist, f"hcp_register_{family}: {type(exc).__name__}: {exc}"))
            finally:
                fam._owner = ("<direct>", None)


def build_registry(extra_plugins: Iterable[object] = ()) -> Registry:
    """Run every plugin's register hooks, one plugin at a time, into a new :class:`Registry`.

    ``extra_plugins`` (modules or objects with ``@hookimpl`` functions) are added to the installed
    ones, under their ``__name__``; one that is also installed is loaded once.
    """
    registry = Registry()
    pm = make_plugin_manager(registry, extra_plugins)
    _run_register_hooks(pm, registry)
    return registry


def get_registry() -> Registry:
    """The process-wide registry the ``hcp`` command uses, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the cached registry (the next :func:`get_registry` builds a new one)."""
    global _REGISTRY
    _REGISTRY = None


@contextlib.contextmanager
def using_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one while the block runs (an application embedding the
    ``hcp`` command, or a test running it with extra plugins); the previous one is restored."""
    global _REGISTRY
    previous, _REGISTRY = _REGISTRY, registry
    try:
        yield registry
    finally:
        _REGISTRY = previous


def plugin_listing(registry: Registry, option_lines: Optional[Callable[[Component], List[str]]] = None) -> List[str]:
    """The lines ``hcp plugins`` prints (a stable format, meant to be read by tools too)::

        NAME (DISTRIBUTION VERSION) [MODULE]         one per loaded plugin, sorted by name
          FAMILY: COMPONENT, COMPONENT               its components, by family
          FAMILY (blocked): COMPONENT                its components blocked with PLUGIN:COMPONENT
        hcp failed to load plugin 'NAME' (from distribution DIST): REASON
        NAME: blocked by HCP_BLOCK_PLUGINS           a plugin blocked as a whole (not imported)
        PLUGIN:COMPONENT: blocked by HCP_BLOCK_PLUGINS, but no plugin registers it

    A plugin passed in ``extra_plugins`` shows ``(not installed)`` for its distribution.
    ``option_lines`` (``hcp plugins -v`` passes :func:`hcp_core.config.component_options.component_lines`)
    adds under each family line every component's config keys with their types and defaults.
    """
    lines: List[str] = []
    blocked_names = set()
    for name, (dist, version, module) in sorted(registry.plugins.items()):
        lines.append(f"{name} ({dist or 'not installed'} {version or ''}".rstrip() + f") [{module}]")
        for family in FAMILIES:
            fam = registry.families[family]
            comps = [c.name for c in fam if c.plugin == name]
            if comps:
                lines.append(f"  {family}: {', '.join(comps)}")
            if comps and option_lines is not None:
                for comp in (c for c in fam if c.plugin == name):
                    lines += option_lines(comp)
            blocked = [c.name for c in fam.blocked() if c.plugin == name]
            blocked_names.update((name, c) for c in blocked)
            if blocked:
                lines.append(f"  {family} (blocked): {', '.join(blocked)}")
    lines += [f"hcp failed to load plugin '{n}' (from distribution {d or 'unknown'}): {r}" for n, d, r in registry.failures]
    lines += [f"{name}: blocked by {BLOCK_ENV}" for name in sorted(registry.blocked_plugins)]
    unused = sorted(registry.blocked_components - blocked_names)
    lines += [f"{p}:{c}: blocked by {BLOCK_ENV}, but no plugin registers it" for p, c in unused]
    return lines


def report_failures(registry: Registry, stream=None) -> None:
    """Print one line per plugin that failed to load."""
    stream = stream or sys.stderr
    for name, dist, reason in registry.failures:
        print(f"hcp failed to load plugin '{name}' (from distribution {dist or 'unknown'}): {reason}", file=stream)
