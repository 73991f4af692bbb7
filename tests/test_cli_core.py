"""The ``hcp`` command's core: ``config``, ``plugins``, user errors, and a start-up without torch."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

import core_components
from core_components import MINIMAL_TOML, fake_distribution, normalize, subprocess_env, write
from hcp_core import cli, plugins
from hcp_core.config import load_config, pipeline_to_dict
from hcp_core.errors import ConfigError
from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FAMILIES, Registry

#: Modules that must not load before training starts (each costs seconds).
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "safetensors")
HCP_SCRIPT = Path(sys.executable).parent / "hcp"


@pytest.fixture
def registry(monkeypatch) -> Iterator[Registry]:
    """The process-wide registry, with the test plugin, for commands run in this process."""
    monkeypatch.delenv(plugins.BLOCK_ENV, raising=False)
    reg = plugins.build_registry(extra_plugins=[core_components])
    with plugins.using_registry(reg):
        yield reg


@pytest.fixture
def pipeline_file(tmp_path: Path) -> Path:
    write(tmp_path / "base.toml", 'seed = 7\n[train]\nmax_steps = 50\nlog_every = 5\n')
    return write(tmp_path / "pipe.toml", 'base = ["base.toml"]\n' + MINIMAL_TOML + "\n[train]\nmax_steps = 20\n")


def run_cli(capsys, *argv: str):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_config_prints_the_merged_resolved_pipeline_as_toml(capsys, registry, pipeline_file) -> None:
    rc, out, err = run_cli(capsys, "config", str(pipeline_file))
    assert (rc, err) == (0, "")
    printed = tomllib.loads(out)
    assert printed == normalize(pipeline_to_dict(load_config(pipeline_file, registry=registry), registry))
    assert (printed["seed"], printed["train"]["max_steps"], printed["train"]["log_every"]) == (7, 20, 5)  # base merged, child wins
    assert printed["train"]["scheduler"] == {"type": "constant", "warmup_steps": 0, "min_lr_ratio": 0.0}  # defaults resolved
    assert printed["data"]["ds1"]["bucket"] == {"type": "test_square", "size": 64, "from": "centre"}
    assert "base" not in printed


def test_config_output_is_a_pipeline_that_prints_the_same(capsys, registry, pipeline_file, tmp_path) -> None:
    _, first, _ = run_cli(capsys, "config", str(pipeline_file), "test_unet=[{ lr = 1e-4, layers = ['a'] }]")
    resolved = write(tmp_path / "resolved.toml", first)
    rc, second, err = run_cli(capsys, "config", str(resolved))
    assert (rc, err, second) == (0, "", first)


def test_config_applies_overrides(capsys, registry, pipeline_file) -> None:
    rc, out, _ = run_cli(
        capsys, "config", str(pipeline_file), "data.ds1.batch_size=2", "seed=1919810", 'model.pretrained="x"', "test_unet=[]", "train.min_snr_gamma=5"
    )
    printed = tomllib.loads(out)
    assert rc == 0
    assert (printed["data"]["ds1"]["batch_size"], printed["seed"], printed["model"]["pretrained"]) == (2, 1919810, "x")
    assert printed["test_unet"] == [] and printed["train"]["min_snr_gamma"] == 5.0


def test_a_user_error_exits_2_with_a_short_message(capsys, registry, pipeline_file) -> None:
    rc, out, err = run_cli(capsys, "config", str(pipeline_file), "data.ds1.batch_sise=2")
    assert (rc, out) == (2, "")
    assert err.startswith("hcp: error: invalid config:\n  data.ds1.batch_sise: unknown key. Did you mean 'batch_size'?")
    assert "Traceback" not in err


def test_debug_shows_the_traceback(registry, pipeline_file) -> None:
    with pytest.raises(ConfigError, match="batch_sise"):
        cli.main(["--debug", "config", str(pipeline_file), "data.ds1.batch_sise=2"])


def test_debug_may_follow_the_command(registry, pipeline_file) -> None:
    with pytest.raises(ConfigError, match="batch_sise"):
        cli.main(["config", str(pipeline_file), "data.ds1.batch_sise=2", "--debug"])


def test_a_missing_file_is_a_user_error(capsys, registry, tmp_path) -> None:
    rc, _, err = run_cli(capsys, "config", str(tmp_path / "nope.toml"))
    assert (rc, err) == (2, f"hcp: error: config file not found: {tmp_path / 'nope.toml'}\n")


def test_no_command_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2
    assert "usage: hcp" in capsys.readouterr().err


def test_plugins_lists_each_plugin_with_distribution_version_and_components(capsys, registry) -> None:
    rc, out, _ = run_cli(capsys, "plugins")
    assert rc == 0
    lines = out.splitlines()
    version = importlib.metadata.version("hcp")
    losses = lines.index(f"losses (hcp {version}) [hcp_plugins.losses]")
    assert lines[losses + 1].startswith("  losses: ") and "mse" in lines[losses + 1].split(": ")[1].split(", ")
    ours = lines.index("core_components (not installed) [core_components]")
    assert lines[ours + 1 : ours + 5] == [
        "  data_sources: test_listing",
        "  buckets: test_square",
        "  text_transforms: test_upper",
        "  adapters: test_layers",
    ]
    # Every registered component is listed under its plugin.
    for family in FAMILIES:
        for comp in registry.families[family]:
            assert any(line.startswith(f"  {family}: ") and comp.name in line.split(": ")[1].split(", ") for line in lines)


def test_plugins_reports_plugins_that_failed_to_load(capsys, registry) -> None:
    registry.failures.append(("broken", "hcp-broken", "ImportError: needs libfoo"))
    rc, out, _ = run_cli(capsys, "plugins")
    assert rc == 0
    assert "hcp failed to load plugin 'broken' (from distribution hcp-broken): ImportError: needs libfoo\n" in out
    assert "core_components (not installed) [core_components]" in out


def test_a_plugin_conflict_at_start_up_is_a_user_error(capsys, monkeypatch) -> None:
    class Duplicate:
        @staticmethod
        @hookimpl
        def hcp_register_buckets(registry) -> None:
            registry.add("test_square", config=core_components.SquareConfig, factory="elsewhere:Square")

    build = plugins.build_registry
    plugins.reset_registry()  # the command builds the registry itself, where the conflict surfaces
    monkeypatch.setattr(plugins, "build_registry", lambda: build(extra_plugins=[core_components, Duplicate]))
    try:
        rc, _, err = run_cli(capsys, "plugins")
    finally:
        plugins.reset_registry()
    assert rc == 2
    assert err.startswith("hcp: error: bucket 'test_square' is registered twice: by plugin ")
    assert "'Duplicate'" in err and "'core_components'" in err and "Traceback" not in err


# --------------------------------------------------------------------------- in a fresh process
def hcp(*argv: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcp_core", *argv], capture_output=True, text=True, env=env or subprocess_env(), cwd=cwd, timeout=60)


def test_start_up_validation_and_plugin_listing_import_no_torch(tmp_path) -> None:
    """Start-up, registration, ``hcp plugins`` and ``hcp config`` import nothing heavy, and no
    component's factory module (factories load only when a pipeline is built)."""
    site = fake_distribution(tmp_path / "site", "hcp-core-test", {core_components.PLUGIN_NAME: "core_components"})
    pipe = write(tmp_path / "pipe.toml", MINIMAL_TOML)
    code = (
        "import contextlib, io, json, sys\n"
        "import hcp_core.cli as cli\n"
        "from hcp_core.plugins import build_registry\n"
        "cli.build_parser(); registry = build_registry()\n"
        # The test plugin keeps its factories beside its hooks; every shipped plugin must not.
        "eager = [c.factory for f in registry.families.values() for c in f\n"
        f"         if c.plugin != {core_components.PLUGIN_NAME!r} and c.factory.partition(':')[0] in sys.modules]\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    codes = [cli.main(['plugins']), cli.main(['config', {str(pipe)!r}])]\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'exit codes': codes, 'heavy modules': heavy, 'factories imported at registration': eager}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(site), timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"exit codes": [0, 0], "heavy modules": [], "factories imported at registration": []}


def test_help_is_fast() -> None:
    assert HCP_SCRIPT.is_file(), "the hcp console script is not installed next to this Python"
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run([str(HCP_SCRIPT), "--help"], capture_output=True, text=True, env=subprocess_env(), timeout=60)
        timings.append(time.perf_counter() - start)
        assert done.returncode == 0 and done.stdout.startswith("usage: hcp")
    for command in ("run", "config", "check", "plugins"):
        assert command in done.stdout
    assert min(timings) < 1.0, f"hcp --help took {min(timings):.2f}s at best"


def test_user_error_in_a_real_process_has_no_traceback_unless_debug(tmp_path) -> None:
    missing = tmp_path / "missing.toml"
    done = hcp("config", str(missing))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"hcp: error: config file not found: {missing}\n")
    debug = hcp("--debug", "config", str(missing))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError: config file not found" in debug.stderr
