"""Finding and loading plugins: entry points, built-ins, blocking, broken plugins, conflicts."""
from __future__ import annotations

import importlib.metadata
import io
import sys
from pathlib import Path

import attrs
import pytest

import core_components
from hcp_core import plugins
from hcp_core.errors import PluginConflictError, UnknownComponentError
from hcp_core.hookspecs import hookimpl
from hcp_core.plugins import BUILTINS, build_registry, get_registry, report_failures, reset_registry


@attrs.define
class Empty:
    """Nothing to configure."""


@pytest.fixture(autouse=True)
def _unblocked(monkeypatch):
    monkeypatch.delenv(plugins.BLOCK_ENV, raising=False)


@pytest.fixture
def site(tmp_path: Path, monkeypatch) -> Path:
    """A folder on sys.path that tests fill with modules and fake installed distributions."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("hcp_pm_test_")]:
        del sys.modules[name]


def test_builtins_load_through_their_entry_points_with_distribution_and_version() -> None:
    reg = build_registry()
    for name, module in BUILTINS.items():
        dist, version, loaded = reg.plugins[name]
        assert (dist, loaded) == ("hcp", module)
        assert version == importlib.metadata.version("hcp")
    assert reg.failures == []
    mse = reg.losses.get("mse")
    assert (mse.plugin, mse.distribution, mse.factory) == ("losses", "hcp", "hcp_plugins.losses.mse:MseLoss")


def test_builtins_are_registered_directly_when_no_metadata_is_installed(monkeypatch) -> None:
    monkeypatch.setattr(plugins.md, "entry_points", lambda **kw: [])
    reg = build_registry()
    assert sorted(reg.plugins) == sorted(BUILTINS)
    assert reg.losses.get("mse").plugin == "losses"


def test_a_module_named_by_two_entry_points_registers_once(site: Path) -> None:
    core_components.fake_distribution(site, "hcp-alias", {"alias_of_losses": "hcp_plugins.losses"})
    reg = build_registry()  # no "registered twice" error
    assert [c.name for c in reg.losses] == ["masked_mse", "mse"]
    assert reg.failures == []


def test_extra_plugin_components_name_their_plugin() -> None:
    reg = build_registry(extra_plugins=[core_components])
    assert reg.plugins[core_components.PLUGIN_NAME] == (None, None, core_components.PLUGIN_NAME)
    for family, name in [("data_sources", "test_listing"), ("buckets", "test_square"), ("text_transforms", "test_upper"), ("adapters", "test_layers")]:
        comp = reg.families[family].get(name)
        assert (comp.plugin, comp.distribution) == (core_components.PLUGIN_NAME, None)


def test_an_installed_plugin_is_found_through_its_entry_point(site: Path) -> None:
    core_components.write(site / "hcp_pm_test_good.py", """\
        import attrs
        from hcp_core.hookspecs import hookimpl

        @attrs.define
        class L1Config:
            '''Mean absolute error.'''

        @hookimpl
        def hcp_register_losses(registry):
            registry.add("l1", config=L1Config, factory="hcp_pm_test_good:L1")
        """)
    core_components.fake_distribution(site, "hcp-good-plugin", {"good": "hcp_pm_test_good"}, version="2.3")
    reg = build_registry()
    assert reg.plugins["good"] == ("hcp-good-plugin", "2.3", "hcp_pm_test_good")
    l1 = reg.losses.get("l1")
    assert (l1.plugin, l1.distribution, l1.doc) == ("good", "hcp-good-plugin", "Mean absolute error.")


@pytest.mark.parametrize(
    "source, reason",
    [
        ("raise ImportError('needs libfoo')", "ImportError: needs libfoo"),
        ("1 +", "SyntaxError: "),
        ("import hcp_pm_test_no_such_module", "ModuleNotFoundError: No module named 'hcp_pm_test_no_such_module'"),
        # pluggy rejects a hook implementation with an argument the spec does not have.
        (
            "from hcp_core.hookspecs import hookimpl\n@hookimpl\ndef hcp_register_losses(registry, extra):\n    pass\n",
            "PluginValidationError: ",
        ),
    ],
    ids=["import-error", "syntax-error", "missing-dependency", "bad-hook-signature"],
)
def test_a_broken_plugin_is_reported_by_name_and_distribution_and_the_rest_load(site: Path, source: str, reason: str) -> None:
    core_components.write(site / "hcp_pm_test_broken.py", source + "\n")
    core_components.fake_distribution(site, "hcp-broken-plugin", {"broken": "hcp_pm_test_broken"})
    reg = build_registry(extra_plugins=[core_components])
    ((name, dist, why),) = reg.failures
    assert (name, dist) == ("broken", "hcp-broken-plugin")
    assert why.startswith(reason)
    assert "broken" not in reg.plugins
    assert "mse" in reg.losses and "test_square" in reg.buckets
    out = io.StringIO()
    report_failures(reg, out)
    assert out.getvalue() == f"hcp failed to load plugin 'broken' (from distribution hcp-broken-plugin): {why}\n"


def test_report_failures_writes_to_stderr_by_default(capsys) -> None:
    reg = plugins.Registry()
    reg.failures.append(("x", None, "ImportError: nope"))
    report_failures(reg)
    assert capsys.readouterr().err == "hcp failed to load plugin 'x' (from distribution unknown): ImportError: nope\n"


def test_blocked_plugins_are_not_loaded(site: Path, monkeypatch) -> None:
    core_components.write(site / "hcp_pm_test_broken.py", "raise ImportError('needs libfoo')\n")
    core_components.fake_distribution(site, "hcp-broken-plugin", {"broken": "hcp_pm_test_broken"})
    monkeypatch.setenv(plugins.BLOCK_ENV, " broken, losses ,core_components")
    assert plugins.blocked_plugins() == {"broken", "losses", "core_components"}
    reg = build_registry(extra_plugins=[core_components])
    assert reg.failures == []  # a blocked plugin is not even imported
    assert "hcp_pm_test_broken" not in sys.modules
    assert not {"broken", "losses", "core_components"} & set(reg.plugins)
    assert reg.losses.names() == [] and "test_square" not in reg.buckets
    with pytest.raises(UnknownComponentError, match=r"unknown loss 'mse'\. Known losses: none\."):
        reg.losses.get("mse")


class Duplicate:
    """A plugin object (not a module) registering a built-in name again."""

    @staticmethod
    @hookimpl
    def hcp_register_losses(registry) -> None:
        registry.add("mse", config=Empty, factory="somewhere:Mse")


def test_two_plugins_registering_one_name_is_an_error_naming_both() -> None:
    with pytest.raises(PluginConflictError) as err:
        build_registry(extra_plugins=[Duplicate])
    msg = str(err.value)
    assert msg.startswith("loss 'mse' is registered twice: by plugin ")
    assert "plugin 'Duplicate'" in msg and "plugin 'losses' (from distribution hcp)" in msg


def test_one_name_in_two_families_is_fine() -> None:
    class SameNameElsewhere:
        @staticmethod
        @hookimpl
        def hcp_register_buckets(registry) -> None:
            registry.add("mse", config=Empty, factory="somewhere:Bucket")

    reg = build_registry(extra_plugins=[SameNameElsewhere])
    assert reg.buckets.get("mse").plugin == "SameNameElsewhere"
    assert reg.losses.get("mse").plugin == "losses"


def test_blocking_one_of_two_conflicting_plugins_resolves_the_conflict(monkeypatch) -> None:
    monkeypatch.setenv(plugins.BLOCK_ENV, "losses")
    reg = build_registry(extra_plugins=[Duplicate])
    assert reg.losses.get("mse").factory == "somewhere:Mse"


def test_get_registry_is_built_once_until_reset(monkeypatch) -> None:
    monkeypatch.setattr(plugins, "_REGISTRY", None)
    first = get_registry()
    assert get_registry() is first
    reset_registry()
    second = get_registry()
    assert second is not first and second.losses.names() == first.losses.names()
