"""The ``hcp`` command as a new user meets it: ``--version``, usage errors, overrides written as
messages print them and after options, ``plugins -v`` and ``layers`` (names that ``layers`` accepts)."""
from __future__ import annotations

import importlib.metadata
import io
import tomllib
from typing import Dict, List, Tuple

import attrs
import pytest
import torch

from core_components import MINIMAL_TOML, write
from hcp_core import cli
from hcp_core.config.component_options import default_text
from hcp_core.config.convert import toml_keys
from hcp_core.interfaces import AdapterContext
from hcp_core.models.layers_listing import DEFAULT_MARK
from hcp_core.models.family import build_family, family_component
from hcp_core.models.layer_select import select_modules
from hcp_core.registry import FAMILIES
import test_cli_core
from test_cli_core import run_cli

registry = test_cli_core.registry  # the fixture: the built-in plugins plus the test plugin


def test_version_names_hcp_and_its_libraries(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == f"hcp {importlib.metadata.version('hcp')}"
    for dist in ("torch", "diffusers", "transformers"):
        assert f"{dist} {importlib.metadata.version(dist)}" in second


def test_run_without_arguments_asks_for_the_pipeline_only(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "the following arguments are required: PIPELINE.toml\n" in err and "KEY=VALUE" not in err.splitlines()[-1]


def test_overrides_follow_options_and_take_the_paths_messages_print(capsys, registry, tmp_path, monkeypatch) -> None:
    pipe = write(tmp_path / "p.toml", MINIMAL_TOML + "\n[[lora_unet]]\nlr = 1e-4\nrank = 4\nlayers = ['a']\n"
                 "[[lora_unet]]\nlr = 1e-4\nlayers = ['b']\n")
    import hcp_core.train.runner as runner

    calls: List[Tuple] = []
    monkeypatch.setattr(runner, "run", lambda pipeline, resume, overwrite: calls.append((pipeline, resume, overwrite)))
    assert cli.main(["run", str(pipe), "--resume", "seed=3", "lora_unet[1].rank=8"]) == 0
    assert cli.main(["run", str(pipe), "--overwrite", "seed=4", "--resume", "ckpt-dir", "lora_unet.0.alpha=2"]) == 0
    (first, resume1, overwrite1), (second, resume2, overwrite2) = calls
    assert (first.seed, resume1, overwrite1, first.adapters["lora_unet"][1].rank) == (3, "latest", False, 8)
    assert (second.seed, resume2, overwrite2, second.adapters["lora_unet"][0].alpha) == (4, "ckpt-dir", True, 2.0)

    # A message names `lora_unet[0].rank`; that very path fixes it.
    rc, _, err = run_cli(capsys, "config", str(pipe), "lora_unet[0].rank=0")
    assert rc == 2 and "lora_unet[0].rank" in err
    rc, out, _ = run_cli(capsys, "config", str(pipe), "lora_unet[0].rank=16", "data.ds1.sources[0].listing=other.txt")
    printed = tomllib.loads(out)
    assert (rc, printed["lora_unet"][0]["rank"], printed["data"]["ds1"]["sources"][0]["listing"]) == (0, 16, "other.txt")
    rc, _, err = run_cli(capsys, "config", str(pipe), "lora_text_encoder[0].rank=8")
    assert rc == 2 and "'lora_text_encoder' is not set, so it has no item 0; set the whole list" in err
    rc, _, err = run_cli(capsys, "config", str(pipe), "data[0].batch_size=2")
    assert rc == 2 and "'data' is a table, not a list; name its key instead of [0]" in err


def test_plugins_verbose_shows_every_components_options_with_defaults(capsys, registry) -> None:
    rc, out, _ = run_cli(capsys, "plugins", "-v")
    assert rc == 0
    lines = [line.split() for line in out.splitlines()]
    for family in FAMILIES:
        for comp in registry.families[family]:
            assert any(line[:1] == [f"{comp.name}:"] or line == [comp.name] for line in lines), comp.name
            fields = [f for f in attrs.fields(comp.config) if f.init]
            for key, field in zip(toml_keys(comp.config), fields):
                shown = ["=", *default_text(field).split()]
                assert any(line[:1] == [key] and line[-len(shown):] == shown for line in lines), (comp.name, key)
    # Independent of the formatter: documented defaults (docs/data.md) and a required key.
    assert ["from", "str", "=", '"ratios"'] in lines and ["step", "int", "=", "64"] in lines
    assert any(line[:1] == ["img_root"] and line[-2:] == ["=", "(required)"] for line in lines)


def listed(out: str) -> Dict[str, Tuple[str, bool]]:
    """name -> (type, marked) from `hcp layers` output rows."""
    rows: Dict[str, Tuple[str, bool]] = {}
    for line in out.splitlines():
        if line.startswith("  ") and not line.startswith("  showing"):
            mark, rest = line[2], line[4:].split()
            rows[rest[0]] = (rest[1], mark == DEFAULT_MARK)
    return rows


def test_layers_lists_names_that_layers_accepts_and_marks_the_default_targets(capsys, demo_model_dir, tmp_path) -> None:
    from hcp_core.config import load_config
    from hcp_core.plugins import get_registry
    from hcp_core.train.preflight import check_model
    from hcp_plugins.adapters.lora.adapter import build_lora_adapter
    from hcp_plugins.adapters.lora.config import LoraGroupConfig

    rc, out, _ = run_cli(capsys, "layers", str(demo_model_dir))
    assert rc == 0
    headers = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert headers[0].startswith("unet (UNet2DConditionModel): ") and "[[lora_unet]]" in headers[0]
    assert headers[1].startswith("text_encoder (CLIPTextModel): ") and "[[tokenizer_pt]]" not in headers[1]
    rows = listed(out)
    rc, out, _ = run_cli(capsys, "layers", str(demo_model_dir), "re:.*attn2$", "--part", "unet")
    attn2 = listed(out)
    assert attn2 and all(".attn2" in name for name in attn2) and len(attn2) < len(rows)

    registry = get_registry()
    family = build_family(family_component(str(demo_model_dir), registry=registry))
    models = family.load_skeleton(str(demo_model_dir))
    # Each listed name selects exactly the module of that name (and its type is the listed one).
    for part in ("unet", "text_encoder"):
        model = models.part(part)
        modules = dict(model.named_modules())
        part_rows = {n: r for n, r in rows.items() if n in modules}
        assert part_rows and all(type(modules[n]).__name__ == t for n, (t, _) in part_rows.items())
        for name in list(part_rows)[::7]:
            assert next(iter(select_modules(model, [name], what="test"))) == name
    # transformers 5's CLIPTextModel has no `text_model.` level, and the listing says so.
    assert any(name.startswith("encoder.layers.0.self_attn.") for name in rows)

    # Fed back into a pipeline, the listed names are what the LoRA adapter wraps.
    linear = sorted(n for n, (t, _) in attn2.items() if t == "Linear")
    pipe = write(tmp_path / "p.toml", f"""
        [model]
        pretrained = "{demo_model_dir}"
        [data.d]
        bucket = {{ type = "fixed", target_size = [64, 64] }}
        sources = [{{ type = "image_folder", img_root = "{tmp_path}" }}]
        [[lora_unet]]
        layers = {linear!r}
        """)
    report = io.StringIO()
    assert check_model(load_config(pipe), out=report)[0], report.getvalue()
    context = AdapterContext(exp_dir=str(tmp_path), default_layers=family.default_layers)
    chosen = build_lora_adapter({"unet": [LoraGroupConfig(layers=linear)]}, context=context)
    defaults = build_lora_adapter({"unet": [LoraGroupConfig()], "text_encoder": [LoraGroupConfig()]}, context=context)
    with torch.device("meta"):
        chosen.attach(models)
    assert sorted(name.split(".", 1)[1] for name in chosen.layers) == linear
    models = family.load_skeleton(str(demo_model_dir))
    with torch.device("meta"):
        defaults.attach(models)  # layers left out: the family's default targets
    wrapped = {name.split(".", 1)[1] for name in defaults.layers}
    marked_layers = {n for n, (t, marked) in rows.items() if marked and t in ("Linear", "Conv2d")}
    assert wrapped == marked_layers
