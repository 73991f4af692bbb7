"""LoRA and fine-tuning on diffusion transformers (FLUX, SD3): attach, export, read back.

The models are the tiny demo folders, loaded part by part with diffusers / transformers directly
(no model family plugin needed). The files hcp writes are loaded in a fresh interpreter by
diffusers' own ``FluxPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from hcp_core.errors import UserError
from hcp_core.interfaces import AdapterContext, FileHeader, ModelBundle
from hcp_plugins.adapters.finetune.adapter import FinetuneAdapter
from hcp_plugins.adapters.finetune.config import FinetuneGroup
from hcp_plugins.adapters.lora.adapter import build_lora_adapter
from hcp_plugins.adapters.lora.config import LoraGroupConfig
from hcp_plugins.adapters.lora.files import LoraFiles
from hcp_plugins.adapters.lora.lora_file import read_lora_file
from hcp_plugins.adapters.lora.merge import apply_lora_file

# --------------------------------------------------------------------------- models and groups
#: Attention (Linear), float-rank feed-forward, FLUX's single-block projections and the top-level
#: proj_out (whose name is a suffix of every single block's proj_out: the export must not let a
#: loader confuse them), each group with its own rank and alpha.
FLUX_GROUPS = [
    LoraGroupConfig(layers=[r"re:.*\.attn$"], rank=4, alpha=2.0),
    LoraGroupConfig(layers=[r"re:.*\.ff(_context)?$"], rank=0.25, alpha=1.5),
    LoraGroupConfig(layers=[r"re:single_transformer_blocks\.\d+\.proj_(mlp|out)$", "proj_out", "x_embedder"],
                    rank=2, alpha=3.0),  # fmt: skip
]
#: SD3: attention (both attentions of the dual-attention block), feed-forward, and the patch
#: embedding, a Conv2d with stride 2.
SD3_GROUPS = [
    LoraGroupConfig(layers=[r"re:.*\.attn2?$"], rank=4, alpha=2.0),
    LoraGroupConfig(layers=[r"re:.*\.ff(_context)?$"], rank=3, alpha=1.0),
    LoraGroupConfig(layers=["pos_embed.proj", "proj_out"], rank=2, alpha=4.0),
]
#: Self-attention of every CLIP layer, whichever transformers spelling the model has.
TE_GROUPS = [LoraGroupConfig(layers=[r"re:(.*\.)?encoder\.layers\.\d+\.self_attn$"], rank=3, alpha=1.0)]


def _frozen(module):
    module.requires_grad_(False)
    return module.eval()


def flux_bundle(model_dir) -> ModelBundle:
    """The demo FLUX transformer and CLIP text encoder in a ModelBundle (no VAE, no T5)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    return ModelBundle(
        unet=None, vae=None, tokenizer=None, scheduler=None, kind="flux", source=str(model_dir),
        transformer=_frozen(FluxTransformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")),
        text_encoder=_frozen(CLIPTextModel.from_pretrained(str(Path(model_dir) / "text_encoder"))),
    )  # fmt: skip


def sd3_bundle(model_dir) -> ModelBundle:
    """The demo SD3 transformer and both CLIP text encoders in a ModelBundle (no VAE, no T5)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    te = [_frozen(CLIPTextModelWithProjection.from_pretrained(str(Path(model_dir) / sub)))
          for sub in ("text_encoder", "text_encoder_2")]  # fmt: skip
    return ModelBundle(
        unet=None, vae=None, tokenizer=None, scheduler=None, kind="sd3", source=str(model_dir),
        transformer=_frozen(SD3Transformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")),
        text_encoder=te[0], text_encoder_2=te[1],
    )  # fmt: skip


def flux_inputs(bundle: ModelBundle) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    cfg = bundle.transformer.config
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "hidden_states": torch.randn(1, h * w, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.6]),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(7, 3),
        "guidance": torch.tensor([3.5]),
        "ids": torch.randint(0, bundle.text_encoder.config.vocab_size, (1, 9), generator=g),
    }


def sd3_inputs(bundle: ModelBundle) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    cfg = bundle.transformer.config
    return {
        "hidden_states": torch.randn(1, cfg.in_channels, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 9, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([600.0]),
        "ids": torch.randint(0, bundle.text_encoder.config.vocab_size, (1, 9), generator=g),
    }


@torch.no_grad()
def outputs(parts: Any, inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """Transformer prediction, then each CLIP encoder's last hidden state (a bundle or a pipeline)."""
    kwargs = {k: v for k, v in inputs.items() if k != "ids"}
    out = [parts.transformer(**kwargs, return_dict=False)[0]]
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(parts, name, None)
        if te is not None and type(te).__name__.startswith("CLIP"):
            out.append(te(inputs["ids"])[0])
    return out


def context(tmp_path, **extra) -> AdapterContext:
    return AdapterContext(exp_dir=str(tmp_path), resolution=(64, 64), seed=3, extra={"max_steps": 5, **extra})


def flux_sections(te: bool = True) -> Dict[str, List[LoraGroupConfig]]:
    return {"transformer": list(FLUX_GROUPS), **({"text_encoder": list(TE_GROUPS)} if te else {})}


def sd3_sections() -> Dict[str, List[LoraGroupConfig]]:
    return {"transformer": list(SD3_GROUPS), "text_encoder": list(TE_GROUPS), "text_encoder_2": list(TE_GROUPS)}


def randomise(adapter, seed: int = 0, amount: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers.values():
            for p in (layer.branch.up.weight, layer.branch.down.weight):
                p.add_(amount * torch.randn(p.shape, generator=g))


def trained(bundle: ModelBundle, sections, tmp_path, **options):
    adapter = build_lora_adapter(sections, context=context(tmp_path, lora=options))
    adapter.attach(bundle)
    randomise(adapter)
    return adapter


def assert_close(ours, theirs, atol=1e-5):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------- diffusers, fresh process
# Only diffusers, the demo folder and the file: no hcp code. Warnings and diffusers' log go to stderr.
LOAD_IN_DIFFUSERS = textwrap.dedent(
    """
    import sys, warnings, torch
    import diffusers
    warnings.simplefilter("always")
    diffusers.utils.logging.set_verbosity_warning()
    pipeline, model_dir, lora, inputs_file, out_file = sys.argv[1:6]
    inputs = torch.load(inputs_file)
    pipe = getattr(diffusers, pipeline).from_pretrained(model_dir)
    pipe.load_lora_weights(lora)
    kwargs = {k: v for k, v in inputs.items() if k != "ids"}
    out = []
    with torch.no_grad():
        out.append(pipe.transformer(**kwargs, return_dict=False)[0])
        for name in ("text_encoder", "text_encoder_2"):
            te = getattr(pipe, name, None)
            if te is not None and type(te).__name__.startswith("CLIP"):
                out.append(te(inputs["ids"])[0])
    torch.save(out, out_file)
    """
)


def load_in_diffusers(pipeline: str, model_dir, lora: str, inputs, tmp_path) -> Tuple[List[torch.Tensor], str]:
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", LOAD_IN_DIFFUSERS, pipeline, str(model_dir), lora, str(tmp_path / "inputs.pt"),
           str(tmp_path / "out.pt")]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt"), run.stderr


def assert_no_key_warnings(stderr: str) -> None:
    lowered = stderr.lower()
    for word in ("unexpected", "missing", "inconsistency", "no lora keys", "additional target modules"):
        assert word not in lowered, stderr[-3000:]


def test_flux_file_loads_in_a_fresh_diffusers_process(flux_model_dir, tmp_path):
    bundle = flux_bundle(flux_model_dir)
    inputs = flux_inputs(bundle)
    before = outputs(bundle, inputs)
    adapter = trained(bundle, flux_sections(), tmp_path)
    assert {layer.group for layer in adapter.layers.values()} >= {"lora_transformer[0]", "lora_transformer[2]"}
    ours = outputs(bundle, inputs)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours, before))  # the LoRA matters
    [path] = adapter.export(bundle, str(tmp_path), None)

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer.single_transformer_blocks.0.proj_out.lora_A.weight" in keys
    assert "transformer.proj_out.lora_B.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert meta["hcp_family"] == "flux" and meta["ss_base_model_version"] == "flux1" and meta["hcp_format"] == "peft"

    theirs, stderr = load_in_diffusers("FluxPipeline", flux_model_dir, path, inputs, tmp_path)
    assert_no_key_warnings(stderr)
    assert_close(ours, theirs)


def test_sd3_file_loads_in_a_fresh_diffusers_process(sd3_model_dir, tmp_path):
    bundle = sd3_bundle(sd3_model_dir)
    inputs = sd3_inputs(bundle)
    before = outputs(bundle, inputs)
    adapter = trained(bundle, sd3_sections(), tmp_path)
    ours = outputs(bundle, inputs)
    assert len(ours) == 3 and all((a - b).abs().max() > 1e-3 for a, b in zip(ours, before))
    [path] = adapter.export(bundle, str(tmp_path), 2)
    assert path.endswith("lora-2.safetensors")
    lora = read_lora_file(path)
    assert lora.layout == "peft" and lora.metadata["hcp_family"] == "sd3"
    assert lora.metadata["ss_base_model_version"] == "sd3"
    assert "transformer.pos_embed.proj" in lora.weights and "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj" in lora.weights

    theirs, stderr = load_in_diffusers("StableDiffusion3Pipeline", sd3_model_dir, path, inputs, tmp_path)
    assert_no_key_warnings(stderr)
    assert_close(ours, theirs)


# --------------------------------------------------------------------------- hcp reads its files back
def test_init_from_a_transformer_file_continues_exactly(flux_model_dir, tmp_path):
    bundle = flux_bundle(flux_model_dir)
    inputs = flux_inputs(bundle)
    adapter = trained(bundle, flux_sections(), tmp_path)
    ours = outputs(bundle, inputs)
    [path] = adapter.export(bundle, str(tmp_path), None)

    fresh = flux_bundle(flux_model_dir)
    seeded = [LoraGroupConfig(layers=g.layers, rank=8, alpha=9.0, init_from=path) for g in FLUX_GROUPS]
    te = [LoraGroupConfig(layers=g.layers, init_from=path) for g in TE_GROUPS]
    again = build_lora_adapter({"transformer": seeded, "text_encoder": te}, context=context(tmp_path))
    again.attach(fresh)
    assert set(again.layers) == set(adapter.layers)
    for key, layer in adapter.layers.items():  # the file's ranks, alphas and factors, bit for bit
        b, a = again.layers[key].branch, layer.branch
        assert (b.rank, b.alpha) == (a.rank, a.alpha)
        assert torch.equal(b.down.weight, a.down.weight) and torch.equal(b.up.weight, a.up.weight)
    for x, y in zip(outputs(fresh, inputs), ours):
        assert torch.equal(x, y)

    # A checkpoint's trainable state restores exactly too (resume).
    state = {k: v.clone() for k, v in adapter.trainable_state().items()}
    assert any(k.startswith("transformer.single_transformer_blocks.0.proj_out.") for k in state)
    randomise(again, seed=5)
    again.load_trainable_state(state)
    for x, y in zip(outputs(fresh, inputs), ours):
        assert torch.equal(x, y)


def test_generate_and_merge_read_the_transformer_file(flux_model_dir, tmp_path):
    from safetensors import safe_open

    bundle = flux_bundle(flux_model_dir)
    inputs = flux_inputs(bundle)
    adapter = trained(bundle, flux_sections(), tmp_path)
    ours = outputs(bundle, inputs)
    [path] = adapter.export(bundle, str(tmp_path), None)
    with safe_open(path, framework="pt") as f:
        header = FileHeader(path=path, metadata=dict(f.metadata()), keys=tuple(f.keys()), safetensors=True)
    files = LoraFiles()
    assert files.reads(header)
    merged = flux_bundle(flux_model_dir)
    assert files.apply(merged, path, 1.0) == len(adapter.layers)
    assert_close(ours, outputs(merged, inputs), atol=1e-4)
    # A diffusers pipeline works as well (its parts are found by name).
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux_model_dir))
    assert apply_lora_file(pipe, path, 0.5) == len(adapter.layers)


def test_transformer_files_are_validated(flux_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bundle = flux_bundle(flux_model_dir)
    adapter = trained(bundle, flux_sections(te=False), tmp_path)
    [path] = adapter.export(bundle, str(tmp_path), None)
    tensors = load_file(path)
    key = "transformer.proj_out.lora_B.weight"
    bad = dict(tensors, **{key: torch.full_like(tensors[key], float("nan"))})
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match=r"nan\.safetensors: 'transformer\.proj_out\.lora_B\.weight' holds NaN"):
        read_lora_file(tmp_path / "nan.safetensors")
    down = "transformer.proj_out.lora_A.weight"
    bad = dict(tensors, **{down: tensors[down][:1]})
    save_file(bad, str(tmp_path / "rank.safetensors"))
    with pytest.raises(UserError, match=r"rank\.safetensors: 'transformer\.proj_out\.lora_B\.weight' has shape"):
        read_lora_file(tmp_path / "rank.safetensors")
    # Applied to a model with another transformer, the layer is named.
    other = {"transformer": torch.nn.Module()}
    with pytest.raises(UserError, match="is not in this model"):
        apply_lora_file(other, path)


# --------------------------------------------------------------------------- formats and messages
def test_kohya_is_refused_for_transformer_families(flux_model_dir, sd3_model_dir, tmp_path):
    sd3 = sd3_bundle(sd3_model_dir)  # FLUX's kohya layout is written: tests/test_flux_kohya.py
    adapter = build_lora_adapter(sd3_sections(), context=context(tmp_path, lora={"format": "kohya"}))
    with pytest.raises(UserError, match=r'\[lora\] format = "kohya".*sd3.*format = "peft"'):
        adapter.attach(sd3)
    assert not adapter.layers and not any(m for m in sd3.transformer.modules() if hasattr(m, "hcp_lora"))
    bundle = flux_bundle(flux_model_dir)
    # Explicit "peft" is the same as leaving format out.
    adapter = trained(bundle, flux_sections(te=False), tmp_path, format="peft")
    [path] = adapter.export(bundle, str(tmp_path), None)
    config = json.loads(read_lora_file(path).metadata["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 2.0
    assert "^proj_out" in config["transformer.rank_pattern"]  # anchored: not single blocks' proj_out


def test_sd_default_stays_kohya(demo_model_dir, tmp_path):
    from hcp_plugins.models.stable_diffusion.loading import load_models

    bundle = load_models(str(demo_model_dir))
    adapter = build_lora_adapter({"unet": [LoraGroupConfig(layers=[r"re:.*\.attn1$"])]}, context=context(tmp_path))
    adapter.attach(bundle)
    [path] = adapter.export(bundle, str(tmp_path), None)
    lora = read_lora_file(path)
    assert lora.layout == "kohya" and lora.metadata["hcp_format"] == "kohya"
    assert lora.metadata["ss_base_model_version"] == "sd_v1" and lora.metadata["hcp_family"] == "sd"


def test_messages_name_the_transformer_sections(flux_model_dir, tmp_path):
    bundle = flux_bundle(flux_model_dir)
    adapter = build_lora_adapter({"transformer": [LoraGroupConfig(layers=["transformer_blocks.0.attn.to_qq"])]},
                                 context=context(tmp_path))  # fmt: skip
    with pytest.raises(UserError, match=r"lora_transformer\[0\]\.layers.*to_qq"):
        adapter.attach(bundle)
    adapter = build_lora_adapter({"unet": [LoraGroupConfig(layers=["conv_in"])]}, context=context(tmp_path))
    with pytest.raises(UserError, match=r"lora_unet: this model has no 'unet'"):
        adapter.attach(bundle)
    sd = ModelBundle(unet=torch.nn.Linear(2, 2), vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    adapter = build_lora_adapter({"transformer": [LoraGroupConfig(layers=["x"])]}, context=context(tmp_path))
    with pytest.raises(UserError, match=r"lora_transformer: this model has no 'transformer'"):
        adapter.attach(sd)


# --------------------------------------------------------------------------- fine-tuning
def test_transformer_finetune_group_trains_only_its_layers(flux_model_dir, tmp_path):
    from safetensors.torch import load_file

    bundle = flux_bundle(flux_model_dir)
    tx = bundle.transformer
    start = {k: v.clone() for k, v in tx.state_dict().items()}
    te_start = {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()}
    ft = FinetuneAdapter({"transformer": [FinetuneGroup(layers=["single_transformer_blocks"], lr=1e-2),
                                          FinetuneGroup(layers=["proj_out"], lr=1e-3)]},
                         context=context(tmp_path))  # fmt: skip
    groups = ft.attach(bundle)
    assert [g["name"] for g in groups] == ["transformer[0]", "transformer[1]"]
    trainable = {n for n, p in tx.named_parameters() if p.requires_grad}
    assert trainable == {n for n in start if n.startswith(("single_transformer_blocks.", "proj_out."))}
    assert not any(p.requires_grad for p in bundle.text_encoder.parameters())

    opt = torch.optim.SGD(groups, lr=1e-2)
    inputs = flux_inputs(bundle)
    kwargs = {k: v for k, v in inputs.items() if k != "ids"}
    tx(**kwargs, return_dict=False)[0].square().mean().backward()
    opt.step()
    after = tx.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and changed <= trainable
    assert any(k.startswith("single_transformer_blocks.") for k in changed) and "proj_out.weight" in changed
    assert all(torch.equal(v, bundle.text_encoder.state_dict()[k]) for k, v in te_start.items())

    [path] = ft.export(bundle, str(tmp_path), None)
    saved = load_file(path)
    assert set(saved) == {f"transformer.{n}" for n in trainable}
    assert torch.equal(saved["transformer.proj_out.weight"], after["proj_out.weight"])


def test_finetune_section_without_its_part_is_a_user_error(tmp_path):
    sd = ModelBundle(unet=torch.nn.Linear(2, 2), vae=None, text_encoder=None, tokenizer=None, scheduler=None)
    ft = FinetuneAdapter({"transformer": [FinetuneGroup(layers=["x"])]}, context=context(tmp_path))
    with pytest.raises(UserError, match=r"\[\[transformer\]\]: this model has no 'transformer'"):
        ft.attach(sd)


def test_t5_lora_is_read_back_by_hcp_and_warned_about(flux_model_dir, tmp_path, caplog):
    from transformers import T5EncoderModel

    bundle = flux_bundle(flux_model_dir)
    bundle.text_encoder_2 = _frozen(T5EncoderModel.from_pretrained(str(Path(flux_model_dir) / "text_encoder_2")))
    groups = [LoraGroupConfig(layers=[r"re:.*\.SelfAttention$"], rank=2, alpha=1.0)]
    with caplog.at_level("WARNING"):
        adapter = trained(bundle, {"transformer": FLUX_GROUPS[:1], "text_encoder_2": groups}, tmp_path)
    assert "lora_text_encoder_2: LoRA on the T5 encoder" in caplog.text
    ids = torch.arange(1, 8)[None]
    ours = bundle.text_encoder_2(ids)[0]
    [path] = adapter.export(bundle, str(tmp_path), None)
    assert any(k.startswith("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q") for k in read_lora_file(path).weights)

    fresh = flux_bundle(flux_model_dir)
    fresh.text_encoder_2 = _frozen(T5EncoderModel.from_pretrained(str(Path(flux_model_dir) / "text_encoder_2")))
    assert apply_lora_file(fresh, path) == len(adapter.layers)
    torch.testing.assert_close(fresh.text_encoder_2(ids)[0], ours, rtol=1e-5, atol=1e-5)
