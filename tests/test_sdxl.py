"""SDXL on the tiny offline model: loading, conditioning, LoRA training and export, exact resume."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hcp_core
from hcp_core import cli
from hcp_core.errors import ConfigError
from hcp_core.interfaces import AdapterContext
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_plugins.models.stable_diffusion.conditioning import SdxlPromptEncoder, add_time_ids, unet_conditioning
from train_support import assert_same_tensors, hcp, pipeline_toml, trained_tensors, write_pipeline

LORA_ALL_PARTS = """
[[lora_unet]]
lr = 1e-2
rank = 2
alpha = 2.0
layers = ['re:.*\\.attn[12]$', 're:.*resnets\\.0$', 're:add_embedding\\.linear_[12]$']

[[lora_text_encoder]]
lr = 1e-2
rank = 2
layers = ['re:.*self_attn$']

[[lora_text_encoder_2]]
lr = 1e-2
rank = 2
layers = ['re:.*self_attn$', 'text_projection']
"""
PROMPT = "a photo of a red circle on a blue background"
SIZES = dict(original_size_hw=[[96, 72]], crop_top_left=[[8, 0]], target_size_hw=[[64, 56]])


@pytest.fixture(scope="module")
def sdxl_demo(tmp_path_factory) -> Path:
    """``hcp demo --sdxl DIR``: DIR/model-sdxl and DIR/data."""
    root = tmp_path_factory.mktemp("sdxl_demo")
    assert cli.main(["demo", "--sdxl", str(root)]) == 0
    return root


@pytest.fixture(scope="module")
def xl_pipe(sdxl_demo):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(sdxl_demo / "model-sdxl"))


def test_demo_sdxl_folder_loads_as_sdxl(sdxl_demo, xl_pipe):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_dir = sdxl_demo / "model-sdxl"
    assert json.loads((model_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert (sdxl_demo / "data").is_dir() and not (sdxl_demo / "model").exists()
    m = load_models(model_dir)
    assert m.kind == "sdxl"
    assert type(m.text_encoder) is CLIPTextModel and type(m.text_encoder_2) is CLIPTextModelWithProjection
    assert m.tokenizer_2.pad_token == "!" and m.tokenizer.pad_token == "<|endoftext|>"
    hidden = m.text_encoder.config.hidden_size + m.text_encoder_2.config.hidden_size
    assert m.unet.config.cross_attention_dim == hidden and m.unet.config.addition_embed_type == "text_time"
    assert not any(p.requires_grad for p in m.text_encoder_2.parameters()) and not m.text_encoder_2.training
    # the same weights diffusers' own SDXL pipeline reads
    for ours, theirs in ((m.text_encoder_2, xl_pipe.text_encoder_2), (m.unet, xl_pipe.unet)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_a_folder_missing_tokenizer_2_is_named(sdxl_demo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sdxl_demo / "model-sdxl", broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(hcp_core.errors.UserError, match=r"no tokenizer_2/ folder"):
        load_models(broken)


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_conditioning_matches_diffusers_encode_prompt(sdxl_demo, xl_pipe, clip_skip):
    m = load_models(sdxl_demo / "model-sdxl")
    batch = {"prompts": [PROMPT], **{k: torch.tensor(v) for k, v in SIZES.items()}}
    with torch.no_grad():
        cond = unet_conditioning(SdxlPromptEncoder(m, clip_skip=clip_skip), batch)
        # diffusers' clip_skip counts from the penultimate layer SDXL uses, like hcp's
        embeds, _, pooled, _ = xl_pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False,
                                                     clip_skip=clip_skip or None)
    time_ids = xl_pipe._get_add_time_ids((96, 72), (8, 0), (64, 56), dtype=torch.float32,
                                         text_encoder_projection_dim=m.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], time_ids)


def test_time_ids_and_clip_skip_range():
    ids = add_time_ids(torch.tensor([[10, 20], [30, 40]]), [[1, 2], [3, 4]], torch.tensor([[5, 6], [7, 8]]))
    assert ids.tolist() == [[10, 20, 1, 2, 5, 6], [30, 40, 3, 4, 7, 8]] and ids.dtype == torch.float32


def test_clip_skip_beyond_the_encoders_is_a_config_error(sdxl_demo):
    m = load_models(sdxl_demo / "model-sdxl")
    with pytest.raises(ConfigError, match=r"model.clip_skip = 3 .*between 0 and 2"):
        SdxlPromptEncoder(m, clip_skip=3)


# Runs in a fresh interpreter: only diffusers, the model folder and the LoRA file, no hcp code.
LOAD_IN_DIFFUSERS = textwrap.dedent(
    """
    import sys, torch
    from diffusers import StableDiffusionXLPipeline
    model_dir, lora, inputs_file, out_file = sys.argv[1:5]
    x = torch.load(inputs_file)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(lora)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(x["prompt"], device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((96, 72), (8, 0), (64, 56), dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        pred = pipe.unet(x["latents"], x["timestep"], encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.save({"embeds": embeds, "pooled": pooled, "pred": pred}, out_file)
    """
)


def _hcp_outputs(model_dir: Path, cfg: Path, exp: Path | None, inputs: dict) -> dict:
    """hcp's conditioning and UNet prediction, with the LoRA of ``exp``'s last checkpoint (None: base)."""
    from hcp_core.train.runner import build_adapters

    m = load_models(model_dir)
    if exp is not None:
        pipeline = hcp_core.load_config(cfg)
        [(name, adapter)] = build_adapters(pipeline, AdapterContext(exp_dir=str(exp)))
        adapter.attach(m)
        state = trained_tensors(exp)
        adapter.load_trainable_state({k[len(name) + 1:]: v for k, v in state.items()})
    batch = {"prompts": [inputs["prompt"]], **{k: torch.tensor(v) for k, v in SIZES.items()}}
    with torch.no_grad():
        cond = unet_conditioning(SdxlPromptEncoder(m), batch)
        pred = m.unet(inputs["latents"], inputs["timestep"], **cond).sample
    return {"embeds": cond["encoder_hidden_states"], "pooled": cond["added_cond_kwargs"]["text_embeds"], "pred": pred}


def test_hcp_run_lora_on_all_parts_loads_in_a_fresh_diffusers_process(sdxl_demo, tmp_path):
    model_dir, exp = sdxl_demo / "model-sdxl", tmp_path / "exp"
    cfg = write_pipeline(tmp_path, pipeline_toml(model_dir, sdxl_demo / "data", exp, adapters=LORA_ALL_PARTS, max_steps=3))
    done = hcp("run", str(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    lora = load_file(str(exp / "lora.safetensors"))
    prefixes = {k.split(".")[0].split("_")[1] for k in lora}
    assert prefixes == {"unet", "te1", "te2"}
    assert "lora_te2_text_projection.lora_up.weight" in lora
    # SDXL's added-conditioning MLP under its sgm name, the one diffusers' converter, webui and ComfyUI map
    assert {"lora_unet_label_emb_0_0.alpha", "lora_unet_label_emb_0_2.alpha"} <= set(lora)
    assert not any("add_embedding" in k for k in lora)

    inputs = {"prompt": PROMPT, "latents": torch.randn(1, 4, 8, 7, generator=torch.Generator().manual_seed(0)),
              "timestep": torch.tensor([500])}
    ours = _hcp_outputs(model_dir, cfg, exp, inputs)
    base = _hcp_outputs(model_dir, cfg, None, inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", LOAD_IN_DIFFUSERS, str(model_dir), str(exp / "lora.safetensors"),
           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")

    d1 = ours["embeds"].shape[-1] - 48  # encoder 1's slice of the joined hidden states
    views = {
        "te1 hidden": lambda o: o["embeds"][..., :d1],
        "te2 hidden": lambda o: o["embeds"][..., d1:],
        "te2 pooled": lambda o: o["pooled"],
        "unet pred": lambda o: o["pred"],
    }
    for what, view in views.items():
        assert (view(ours) - view(base)).abs().max() > 1e-3, f"the LoRA does not change the {what}"
        torch.testing.assert_close(view(theirs), view(ours), rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


FINETUNE_TE2 = """
[[text_encoder_2]]
lr = 1e-3
layers = ['text_model.encoder.layers.3.mlp.fc2']  # transformers 5 keeps text_model. here
"""


def test_resume_from_a_checkpoint_is_exact(sdxl_demo, tmp_path):
    # LoRA on all three parts plus a fine-tune group on the second text encoder
    model_dir, data = sdxl_demo / "model-sdxl", sdxl_demo / "data"
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for exp in (whole, resumed):
        text = pipeline_toml(model_dir, data, exp, adapters=LORA_ALL_PARTS + FINETUNE_TE2, max_steps=4, save_every=2)
        write_pipeline(tmp_path, text, f"{exp.name}.toml")
    hcp_core.run(hcp_core.load_config(tmp_path / "whole.toml"))
    # the run that "stopped" after step 2: its first checkpoint, and nothing else
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    result = hcp_core.run(hcp_core.load_config(tmp_path / "resumed.toml"), resume="latest")
    assert result.step == 4
    assert_same_tensors(trained_tensors(whole), trained_tensors(resumed), exact=True)
    assert_same_tensors(load_file(str(whole / "lora.safetensors")), load_file(str(resumed / "lora.safetensors")))
    tuned = load_file(str(whole / "finetune.safetensors"))
    assert sorted(tuned) == ["text_encoder_2.text_model.encoder.layers.3.mlp.fc2.bias", "text_encoder_2.text_model.encoder.layers.3.mlp.fc2.weight"]
    base = load_models(model_dir).text_encoder_2.get_submodule("text_model.encoder.layers.3.mlp.fc2")
    assert not torch.equal(tuned["text_encoder_2.text_model.encoder.layers.3.mlp.fc2.weight"], base.weight)



def test_parallel_datasets_with_masks_and_their_own_buckets_train(sdxl_model_dir, demo_data_dir, tmp_path, monkeypatch):
    """Two datasets (one with attention masks and ratio buckets, one fixed 64x64 with a lower loss
    weight) each condition on their own samples' sizes: every step trains on both."""
    second = f"""
[data.reg]
batch_size = 1
loss_weight = 0.5
bucket = {{ type = "fixed", target_size = [64, 64] }}

[[data.reg.sources]]
type = "image_folder"
img_root = "{demo_data_dir}"
prompt_template = "a photo of {{caption}}"
"""
    cfg = write_pipeline(tmp_path, pipeline_toml(sdxl_model_dir, demo_data_dir, tmp_path / "exp", adapters=LORA_ALL_PARTS,
                                                 max_steps=2, masks=True, extra=second))  # fmt: skip
    from hcp_plugins.models.stable_diffusion import conditioning

    seen = []

    def spy(encoder, batch, device=None):
        seen.append((tuple(batch["target_size_hw"][0].tolist()), batch.get("weight_map") is not None))
        return unet_conditioning(encoder, batch, device)

    monkeypatch.setattr(conditioning, "unet_conditioning", spy)
    result = hcp_core.run(hcp_core.load_config(cfg))
    assert result.step == 2 and math.isfinite(result.last_loss)
    assert len(seen) == 4 and seen[1] == ((64, 64), False) and seen[3] == ((64, 64), False)
    assert seen[0][1] and seen[2][1]  # the first dataset's batches carry their masks
