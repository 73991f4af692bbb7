"""The README's library example and the shipped example pipelines run on the demo model."""
from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest

import hcp_core
from hcp_core import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_checkout(tmp_path, demo_model_dir, demo_data_dir, monkeypatch) -> Path:
    """A working directory laid out like a checkout after `hcp demo`: demo/model, demo/data, examples/."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "model").symlink_to(demo_model_dir)
    shutil.copytree(demo_data_dir, tmp_path / "demo" / "data")
    shutil.copytree(REPO / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("plugins"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_library_example_runs(demo_checkout) -> None:
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "hcp_core.load_config" in code and "hcp_core.run" in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.step == 5 and (Path(result.exp_dir) / "lora.safetensors").is_file()


def test_config_override_shows_in_the_printed_pipeline(demo_checkout, capsys) -> None:
    assert cli.main(["config", "examples/quickstart.toml", "seed=7"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["seed"] == 7


def test_quickstart_checks_clean(demo_checkout, capsys) -> None:
    assert cli.main(["check", "examples/quickstart.toml"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "no problems found" in out and "mean aspect error" in out


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.toml")))
def test_every_example_pipeline_validates(demo_checkout, example) -> None:
    pipeline = hcp_core.load_config(f"examples/{example}")
    assert pipeline.data


def test_sdxl_quickstart_trains_and_samples(demo_checkout, sdxl_model_dir) -> None:
    (demo_checkout / "demo" / "model-sdxl").symlink_to(sdxl_model_dir)
    overrides = ["train.max_steps=4", "train.save_every=0", "sample.every=2", "sample.steps=2"]
    result = hcp_core.run(hcp_core.load_config("examples/quickstart-sdxl.toml", overrides))
    exp = Path(result.exp_dir)
    assert result.step == 4 and (exp / "lora.safetensors").is_file()
    for step in (2, 4):
        assert sorted(p.name for p in (exp / "samples" / f"step-{step}").iterdir()) == ["00.png", "01.png", "grid.png"]


def test_flux_quickstart_trains_caches_text_and_samples(demo_checkout, flux_model_dir) -> None:
    (demo_checkout / "demo" / "model-flux").symlink_to(flux_model_dir)
    overrides = ["train.max_steps=4", "train.save_every=0", "sample.every=2", "sample.steps=2"]
    pipeline = hcp_core.load_config("examples/quickstart-flux.toml", overrides)
    assert pipeline.model.family.name == "flux"
    result = hcp_core.run(pipeline)
    exp = Path(result.exp_dir)
    assert result.step == 4 and (exp / "lora.safetensors").is_file()
    assert "text encoder outputs of" in (exp / "train.log").read_text()
    for step in (2, 4):
        assert sorted(p.name for p in (exp / "samples" / f"step-{step}").iterdir()) == ["00.png", "01.png", "grid.png"]
