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
from hcp_core.plugins import build_registry, get_registry, parse_block_list, plugin_listing, report_failures, reset_registry, using_registry

ROOT = Path(__file__).resolve().parents[1]


def declared_builtins() -> dict:
    """The built-in plugins as hcp's pyproject.toml declares them (the one list of them)."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["entry-points"]["hcp"]


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
    for name, module in declared_builtins().items():
        dist, version, loaded = reg.plugins[name]
        assert (dist, loaded) == ("hcp", module)
        assert version == importlib.metadata.version("hcp")
    assert reg.failures == []
    mse = reg.losses.get("mse")
    assert (mse.plugin, mse.distribution, mse.factory) == ("losses", "hcp", "hcp_plugins.losses.mse:MseLoss")


def test_builtins_come_only_from_entry_points(monkeypatch) -> None:
    """The core names no built-in: without entry points there are no components at all."""
    monkeypatch.setattr(plugins.md, "entry_points", lambda **kw: [])
    reg = build_registry()
    assert reg.plugins == {} and all(reg.families[f].names() == [] for f in reg.families)


def test_an_installed_plugin_passed_as_extra_is_loaded_once() -> None:
    """The documented test recipe works while the plugin is also installed (editable installs)."""
    import hcp_plugins.losses

    reg = build_registry(extra_plugins=[hcp_plugins.losses, core_components])
    assert reg.failures == []
    assert reg.losses.get("mse").plugin == "losses"  # its entry-point name, from the first registration
    assert "hcp_plugins.losses" not in reg.plugins


def test_a_misspelt_hook_of_an_extra_plugin_is_reported() -> None:
    class Misspelt:
        @staticmethod
        @hookimpl
        def hcp_register_bucket(registry) -> None:
            raise AssertionError("never called")

    reg = build_registry(extra_plugins=[Misspelt])
    assert reg.failures == [("Misspelt", None, "unknown hook 'hcp_register_bucket'. Did you mean 'hcp_register_buckets'? (it is never called)")]


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


def test_config_errors_name_the_plugins_that_failed_to_load(site: Path) -> None:
    """A component of a plugin that failed to import is "unknown" in the config: the error says why."""
    from hcp_core.config.pipeline import build_pipeline
    from hcp_core.errors import ConfigError

    core_components.write(site / "hcp_pm_test_broken.py", "raise ImportError('needs libfoo')\n")
    core_components.fake_distribution(site, "hcp-broken-plugin", {"broken": "hcp_pm_test_broken"})
    reg = build_registry()
    raw = {"model": {"pretrained": "m"},
           "data": {"ds": {"sources": [{"type": "broken_source", "img_root": "i"}], "bucket": {"type": "ratio"}}}}
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw, reg)
    lines = str(err.value).splitlines()
    assert any("unknown data source 'broken_source'" in line for line in lines)
    assert lines[-1] == ("  note: 1 plugin(s) failed to load, so their components are unknown: broken (ImportError: "
                         "needs libfoo); `hcp plugins` lists what loaded")
    reg.failures.clear()  # the same registry with nothing broken: no note
    with pytest.raises(ConfigError) as clean:
        build_pipeline(raw, reg)
    assert "unknown data source 'broken_source'" in str(clean.value) and "failed to load" not in str(clean.value)


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
    with pytest.raises(UnknownComponentError, match=r"^loss 'mse' is provided by plugin 'losses' \(from distribution hcp\), which is blocked"):
        reg.losses.get("mse")  # only a failed lookup looks into blocked plugins (a broken one is ignored)
    assert reg.failures == []


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


def test_get_registry_is_built_once_until_reset() -> None:
    reset_registry()
    first = get_registry()
    assert get_registry() is first
    reset_registry()
    second = get_registry()
    assert second is not first and second.losses.names() == first.losses.names()
    reset_registry()


def test_using_registry_sets_the_process_wide_one_for_a_block() -> None:
    mine = build_registry(extra_plugins=[core_components])
    before = get_registry()
    with using_registry(mine):
        assert get_registry() is mine
    assert get_registry() is before


def test_block_list_syntax() -> None:
    blocks = parse_block_list(" adapters, losses:mse ,, my_plugin : my_bucket")
    assert blocks.plugins == {"adapters"}
    assert blocks.components == {("losses", "mse"), ("my_plugin", "my_bucket")}
    assert blocks.entry_for("adapters", "lora") == "adapters"
    assert blocks.entry_for("losses", "mse") == "losses:mse"
    assert blocks.entry_for("losses", "masked_mse") is None


def test_a_blocked_component_is_kept_aside_and_named_when_asked_for(monkeypatch) -> None:
    monkeypatch.setenv(plugins.BLOCK_ENV, "losses:mse")
    reg = build_registry()
    assert reg.losses.names() == ["masked_mse"] and [c.name for c in reg.losses.blocked()] == ["mse"]
    with pytest.raises(UnknownComponentError) as err:
        reg.losses.get("mse")
    assert str(err.value) == (
        "loss 'mse' of plugin 'losses' (from distribution hcp) is blocked by HCP_BLOCK_PLUGINS ('losses:mse'); "
        "remove that entry from HCP_BLOCK_PLUGINS to use it."
    )


def test_blocking_one_component_resolves_a_conflict(monkeypatch) -> None:
    monkeypatch.setenv(plugins.BLOCK_ENV, "Duplicate:mse")
    reg = build_registry(extra_plugins=[Duplicate])
    assert reg.losses.get("mse").plugin == "losses"


def test_a_component_of_a_blocked_plugin_is_named_with_its_plugin(site: Path, monkeypatch) -> None:
    monkeypatch.setenv(plugins.BLOCK_ENV, "core_components")
    reg = build_registry(extra_plugins=[core_components])
    assert "test_square" not in reg.buckets
    with pytest.raises(UnknownComponentError) as err:
        reg.buckets.get("test_square")
    assert str(err.value) == (
        "bucket 'test_square' is provided by plugin 'core_components', which is blocked by HCP_BLOCK_PLUGINS "
        "('core_components'); remove that entry from HCP_BLOCK_PLUGINS to use it."
    )
    with pytest.raises(UnknownComponentError, match=r"unknown bucket 'no_such'\."):
        reg.buckets.get("no_such")


def test_plugin_listing_shows_blocked_plugins_and_components(site: Path, monkeypatch) -> None:
    core_components.write(site / "hcp_pm_test_broken.py", "raise ImportError('needs libfoo')\n")
    core_components.fake_distribution(site, "hcp-broken-plugin", {"broken": "hcp_pm_test_broken"})
    monkeypatch.setenv(plugins.BLOCK_ENV, "broken,losses:mse,losses:typo")
    lines = plugin_listing(build_registry())
    version = importlib.metadata.version("hcp")
    at = lines.index(f"losses (hcp {version}) [hcp_plugins.losses]")
    assert lines[at + 1 : at + 3] == ["  losses: masked_mse", "  losses (blocked): mse"]
    assert lines[-2:] == ["broken: blocked by HCP_BLOCK_PLUGINS", "losses:typo: blocked by HCP_BLOCK_PLUGINS, but no plugin registers it"]
    assert "hcp_pm_test_broken" not in sys.modules
