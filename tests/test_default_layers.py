"""Default LoRA layers: a ``[[lora_*]]`` group without ``layers`` targets its model family's
``default_layers(part)`` (the attention and MLP layers), which the core hands to adapters in
``AdapterContext.default_layers`` without naming any family; a family without defaults for a part
gives a clear error, in ``hcp check`` too."""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch
from safetensors import safe_open
from torch import nn

import hcp_core
from hcp_core import cli
from hcp_core.config import build_pipeline
from hcp_core.errors import ConfigError, UserError
from hcp_core.interfaces import AdapterContext
from train_support import pipeline_toml, write_pipeline

FIXED_64 = '{ type = "fixed", target_size = [64, 64] }'
SECTIONS = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_text_encoder",
            "text_encoder_2": "lora_text_encoder_2", "text_encoder_3": "lora_text_encoder_3"}


def build_family(name: str):
    from hcp_plugins.models.config import FluxConfig, SD3Config
    from hcp_plugins.models.flux import FluxFamily
    from hcp_plugins.models.sd3 import SD3Family
    from hcp_plugins.models.stable_diffusion import StableDiffusionFamily

    return {"sd": lambda: StableDiffusionFamily(), "sdxl": lambda: StableDiffusionFamily(),
            "flux": lambda: FluxFamily(FluxConfig()), "sd3": lambda: SD3Family(SD3Config())}[name]()


@pytest.fixture
def model_dirs(request) -> Dict[str, Path]:
    """Only the demo folders a test asks for are built (each fixture once per session)."""
    fixtures = {"sd": "demo_model_dir", "sdxl": "sdxl_model_dir", "flux": "flux_model_dir", "sd3": "sd3_model_dir"}
    return {name: request.getfixturevalue(fx) for name, fx in fixtures.items() if name in request.param}


def expected_layers(model: nn.Module, patterns: List[str]) -> Set[str]:
    """What the patterns select, computed here from ``named_modules()`` alone: every module a
    pattern names (``re:`` + re.match, or the exact name), then each Linear / Conv2d (groups=1)
    equal to or inside one of them."""
    names = [n for n, _ in model.named_modules()]
    chosen = set()
    for p in patterns:
        chosen |= {n for n in names if re.match(p[3:], n)} if p.startswith("re:") else ({p} & set(names))
    return {n for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
            and any(n == c or n.startswith(c + ".") for c in chosen)}


#: Per family: layers that must be chosen by default, and layers that must not (real demo names).
EXPECTED = {
    "sd": {
        "unet": (["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                  "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
                  "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "down_blocks.0.attentions.0.proj_in"],
                 ["down_blocks.0.resnets.0.conv1", "time_embedding.linear_1", "conv_in", "conv_out"]),
        "text_encoder": (["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj",
                          "encoder.layers.0.mlp.fc2"], []),
    },
    "sdxl": {
        "unet": (["mid_block.attentions.0.transformer_blocks.0.attn1.to_k"], ["mid_block.resnets.0.conv1"]),
        "text_encoder": (["encoder.layers.0.mlp.fc1"], []),
        "text_encoder_2": (["text_model.encoder.layers.0.self_attn.v_proj"], ["text_projection"]),
    },
    "flux": {
        "transformer": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                         "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out",
                         "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                         "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
                         "single_transformer_blocks.0.proj_out"],
                        ["transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear",
                         "x_embedder", "context_embedder", "norm_out.linear", "proj_out"]),
        "text_encoder": (["encoder.layers.0.self_attn.k_proj"], []),
        "text_encoder_2": (["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.o"],
                           ["encoder.block.0.layer.1.DenseReluDense.wo"]),
    },
    "sd3": {
        "transformer": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
                         "transformer_blocks.0.attn2.to_k", "transformer_blocks.0.ff_context.net.0.proj"],
                        ["pos_embed.proj", "transformer_blocks.0.norm1.linear", "context_embedder", "proj_out"]),
        "text_encoder": (["text_model.encoder.layers.0.self_attn.q_proj"], ["text_projection"]),
        "text_encoder_2": (["text_model.encoder.layers.0.mlp.fc2"], []),
        "text_encoder_3": (["encoder.block.0.layer.0.SelfAttention.v"], []),
    },
}


def attach_defaults(family, models, parts):
    from hcp_plugins.adapters.lora.adapter import LoraAdapter
    from hcp_plugins.adapters.lora.config import LoraGroupConfig

    context = AdapterContext(exp_dir="unused", default_layers=family.default_layers)
    adapter = LoraAdapter({p: [LoraGroupConfig(rank=2)] for p in parts}, context=context)
    with torch.device("meta"):
        adapter.attach(models)
    return adapter


@pytest.mark.parametrize("model_dirs, name", [(("sd",), "sd"), (("sdxl",), "sdxl"), (("flux",), "flux"),
                                              (("sd3",), "sd3")], indirect=["model_dirs"], ids=lambda x: str(x))
def test_lora_without_layers_attaches_to_the_family_defaults(model_dirs, name, caplog) -> None:
    family = build_family(name)
    models = family.load_skeleton(str(model_dirs[name]))
    parts = list(EXPECTED[name])
    assert set(parts) <= set(family.parts)
    pristine = {p: {n for n, _ in models.part(p).named_modules()} for p in parts}
    expected = {p: expected_layers(models.part(p), family.default_layers(p)) for p in parts}
    with caplog.at_level(logging.INFO, logger="hcp_plugins.adapters.lora.adapter"):
        adapter = attach_defaults(family, models, parts)
    for part in parts:
        patterns = family.default_layers(part)
        assert patterns and all(isinstance(p, str) for p in patterns)
        names = pristine[part]
        for p in patterns:  # every default pattern is a real name on the demo model
            assert any(re.match(p[3:], n) for n in names) if p.startswith("re:") else p in names, (part, p)
        chosen = {layer.name for layer in adapter.layers.values() if layer.target == part}
        assert chosen == expected[part] and chosen, part
        must, must_not = EXPECTED[name][part]
        assert set(must) <= chosen, (part, set(must) - chosen)
        assert not set(must_not) & chosen, (part, set(must_not) & chosen)
        # the log says which patterns and how many layers
        label = f"{SECTIONS[part]}[0]"
        messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith(label + ":")]
        assert messages and f"matched {len(chosen)} layer(s)" in messages[0] and patterns[0] in messages[0]
    assert build_family(name).default_layers("vae") == []


@pytest.mark.parametrize("model_dirs", [("sd",)], indirect=True)
def test_a_family_without_defaults_for_the_part_is_a_clear_error(model_dirs) -> None:
    from hcp_plugins.adapters.lora.adapter import LoraAdapter
    from hcp_plugins.adapters.lora.config import LoraGroupConfig

    models = build_family("sd").load_skeleton(str(model_dirs["sd"]))
    for defaults in (None, lambda part: []):
        adapter = LoraAdapter({"unet": [LoraGroupConfig()]}, context=AdapterContext("unused", default_layers=defaults))
        with pytest.raises(UserError, match=r"lora_unet\[0\]: layers is left out, but the sd model family has no "
                                            r"default layers for the unet; set layers = \["):
            adapter.attach(models)
        assert not adapter.layers
    nothing = LoraAdapter({"unet": [LoraGroupConfig()]},
                          context=AdapterContext("unused", default_layers=lambda part: [r"re:nowhere\.\d+$"]))
    with pytest.raises(UserError, match=r"default layers for the unet \(re:nowhere.*\) match no module of the "
                                        r"UNet2DConditionModel; set layers"):
        nothing.attach(models)
    # explicit layers never consult the family
    named = LoraAdapter({"unet": [LoraGroupConfig(layers=["conv_in"])]}, context=AdapterContext("unused"))
    with torch.device("meta"):
        named.attach(models)
    assert [layer.name for layer in named.layers.values()] == ["conv_in"]


def test_adapter_context_keeps_its_old_arguments() -> None:
    ctx = AdapterContext("runs/x", ".", 1, (64, 64), 3, {"max_steps": 2})
    assert ctx.default_layers is None and ctx.seed == 3


def raw_pipeline(model: Path, data: Path, adapters: Dict) -> Dict:
    return {"model": {"pretrained": str(model)},
            "data": {"ds": {"bucket": {"type": "fixed", "target_size": [64, 64]},
                            "sources": [{"type": "image_folder", "img_root": str(data)}]}}, **adapters}


@pytest.mark.parametrize("model_dirs", [("sd",)], indirect=True)
def test_layers_left_out_is_none_an_empty_list_is_refused_and_finetune_still_needs_layers(model_dirs,
                                                                                           demo_data_dir) -> None:
    model = model_dirs["sd"]
    pipeline = build_pipeline(raw_pipeline(model, demo_data_dir, {"lora_unet": [{"lr": 1e-4}]}))
    assert pipeline.adapters["lora_unet"][0].layers is None
    with pytest.raises(ConfigError, match=r"lora_unet\[0\]\.layers: list at least one layer .*or leave layers out"):
        build_pipeline(raw_pipeline(model, demo_data_dir, {"lora_unet": [{"layers": []}]}))
    with pytest.raises(ConfigError, match=r"unet\[0\]\.layers: required key missing"):
        build_pipeline(raw_pipeline(model, demo_data_dir, {"unet": [{"lr": 1e-5}]}))


def check_toml(folder: Path, model: Path, data: Path, sections: List[str]) -> Path:
    adapters = "".join(f"\n[[{s}]]\nlr = 1e-3\nrank = 2\n" for s in sections)
    return write_pipeline(folder, pipeline_toml(model, data, folder / "runs", adapters=adapters, bucket=FIXED_64))


@pytest.mark.parametrize("model_dirs, name", [(("sd",), "sd"), (("sdxl",), "sdxl"), (("flux",), "flux"),
                                              (("sd3",), "sd3")], indirect=["model_dirs"], ids=lambda x: str(x))
def test_hcp_check_passes_a_pipeline_without_layers(tmp_path, model_dirs, name, demo_data_dir, capsys) -> None:
    sections = [SECTIONS[p] for p in EXPECTED[name]]
    assert cli.main(["check", str(check_toml(tmp_path, model_dirs[name], demo_data_dir, sections))]) == 0
    assert "model: OK" in capsys.readouterr().out


@pytest.mark.parametrize("model_dirs", [("sd",)], indirect=True)
def test_hcp_check_names_the_section_when_the_family_has_no_defaults(tmp_path, model_dirs, demo_data_dir,
                                                                     capsys, monkeypatch) -> None:
    from hcp_plugins.models.stable_diffusion import StableDiffusionFamily

    monkeypatch.delattr(StableDiffusionFamily, "default_layers")  # a family without the optional member
    path = check_toml(tmp_path, model_dirs["sd"], demo_data_dir, ["lora_unet"])
    assert cli.main(["check", str(path)]) != 0
    out = capsys.readouterr().out
    assert "model: ERROR: lora_unet[0]: layers is left out, but the sd model family has no default layers" in out
    assert "set layers = [" in out


@pytest.mark.parametrize("model_dirs", [("flux",)], indirect=True)
def test_a_flux_run_with_a_lora_transformer_without_layers_trains(tmp_path, model_dirs, demo_data_dir,
                                                                  caplog) -> None:
    from hcp_plugins.models.default_layers import FLUX_TRANSFORMER_LAYERS

    text = pipeline_toml(model_dirs["flux"], demo_data_dir, tmp_path / "exp", max_steps=2, bucket=FIXED_64,
                         adapters="\n[[lora_transformer]]\nlr = 1e-3\nrank = 2\n")
    with caplog.at_level(logging.INFO, logger="hcp_plugins.adapters.lora.adapter"):
        result = hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, text)))
    assert result.step == 2 and math.isfinite(result.last_loss)
    assert any("lora_transformer[0]: layers left out" in r.getMessage() for r in caplog.records)
    with safe_open(str(tmp_path / "exp" / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    for layer in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                  "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_k"):
        assert f"transformer.{layer}.lora_A.weight" in keys, layer
    assert not any(".norm1.linear." in k or "x_embedder" in k for k in keys)
    groups = json.loads(meta["hcp_groups"])
    assert groups[0]["section"] == "lora_transformer[0]" and groups[0]["layers"] == list(FLUX_TRANSFORMER_LAYERS)
    # the run folder's config.toml leaves layers out too, so it reloads with the same defaults
    assert "layers" not in (tmp_path / "exp" / "config.toml").read_text()
