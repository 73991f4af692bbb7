"""A fine-tune ends as a whole model: a diffusers folder and an original-layout single file that
diffusers loads (offline) and that reproduce the trained model's outputs; dtypes; peak memory."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import hcp_core
from hcp_core.errors import ConfigError
from hcp_plugins.models.stable_diffusion.loading import load_models
from hcp_core.tools.safetensors_writer import write_safetensors, write_sharded
from hcp_core.train.runner import build_run, train
from hcp_plugins.adapters.finetune.model_export import BaseWeights, check_single_file, write_diffusers_folder, write_single_file
from train_support import pipeline_toml, write_pipeline

FINETUNE = """
[[unet]]
lr = 2e-3
layers = ['down_blocks.0', 'mid_block']

[[text_encoder]]
lr = 2e-3
layers = ['encoder.layers.0']

[finetune]
export = ["trained", "diffusers", "single_file"]
export_dtype = "fp32"
"""


def unet_out(unet, seed: int = 0) -> torch.Tensor:
    """The UNet's output on a fixed input (noisy latents, timestep, text states)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x.to(unet.dtype), torch.tensor([500]), encoder_hidden_states=text.to(unet.dtype)).sample.float()


def text_out(text_encoder) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1674, 539, 49407] + [49407] * 3])
    with torch.no_grad():
        return text_encoder(ids.clamp(max=text_encoder.config.vocab_size - 1)).last_hidden_state.float()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, demo_model_dir, demo_data_dir):
    """A 2-step fine-tune of UNet and text-encoder layers on the demo with EMA, saving at step 1; the run object."""
    tmp = tmp_path_factory.mktemp("finetune")
    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp / "exp", max_steps=2, save_every=1, adapters=FINETUNE,
                         extra="[train.ema]\nenabled = true\ndecay = 0.5\n")
    trainer = build_run(hcp_core.load_config(write_pipeline(tmp, text)))
    try:
        result = train(trainer)
    finally:
        trainer.close()
    trainer.models.unet.eval()
    trainer.models.text_encoder.eval()
    return trainer, Path(result.exp_dir)


def test_exports_load_in_diffusers_and_reproduce_the_trained_model(finetuned, demo_model_dir) -> None:
    from diffusers import StableDiffusionPipeline

    trainer, exp = finetuned
    models = trainer.models
    base = load_models(demo_model_dir)
    raw_unet = unet_out(models.unet)
    with trainer.ema.swapped_in():  # the final exports hold the EMA weights
        unet_ema, text_ema = unet_out(models.unet), text_out(models.text_encoder)
        trained_ema = models.unet.mid_block.resnets[0].conv1.weight.detach().clone()
    assert not torch.allclose(unet_ema, unet_out(base.unet), atol=1e-5), "training changed nothing"
    assert not torch.allclose(text_ema, text_out(base.text_encoder), atol=1e-5)
    assert not torch.allclose(unet_ema, raw_unet, atol=1e-6), "EMA equals the raw weights: the check would be blind"

    folder = StableDiffusionPipeline.from_pretrained(str(exp / "model"), local_files_only=True)
    single = StableDiffusionPipeline.from_single_file(str(exp / "model.safetensors"), config=str(demo_model_dir),
                                                      local_files_only=True)  # fmt: skip
    for pipe in (folder, single):
        assert pipe.unet.dtype == torch.float32
        torch.testing.assert_close(unet_out(pipe.unet), unet_ema, atol=1e-6, rtol=0)
        torch.testing.assert_close(text_out(pipe.text_encoder), text_ema, atol=1e-6, rtol=0)
        for key, value in base.vae.state_dict().items():  # the frozen VAE is written whole
            assert torch.equal(pipe.vae.state_dict()[key], value), key
    # every tensor of the trained file is the model's, and checkpoint-time exports carry the step
    trained = load_file(str(exp / "finetune.safetensors"))
    assert torch.equal(trained["unet.mid_block.resnets.0.conv1.weight"], trained_ema)
    index = json.loads((exp / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (exp / "model-1" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (exp / "model-1.safetensors").is_file() and (exp / "finetune-1.safetensors").is_file()
    assert (exp / "finetune-2.safetensors").is_file() and not (exp / "model-2").exists(), "the last save wrote the model twice"
    assert not [p.name for p in exp.iterdir() if p.name.startswith(".")], "a temporary file or folder was left"


def test_export_dtype_is_the_files_type_and_the_loaded_models(finetuned, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    trainer, _ = finetuned
    models = trainer.models
    base = BaseWeights(models)
    folder = write_diffusers_folder(models, base, tmp_path / "bf16", torch.bfloat16)
    single = write_single_file(models, base, tmp_path / "fp16.safetensors", torch.float16)
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with safe_open(str(single), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["dtype"] == "bfloat16"
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True)
    state = models.unet.state_dict()
    for key, value in unet.state_dict().items():
        assert torch.equal(value.float(), state[key].to(torch.bfloat16).float()), key
    assert models.unet.dtype == torch.float32, "exporting changed the model's own dtype"


def test_options_are_validated_and_unsupported_layouts_refused(tmp_path, demo_model_dir, demo_data_dir) -> None:
    def check(table: str) -> None:
        hcp_core.load_config(write_pipeline(tmp_path, pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "e",
                                                                    adapters="[[unet]]\nlayers = ['mid_block']\n" + table)))

    with pytest.raises(ConfigError, match=r"finetune\.export: unknown export 'ckpt'; choose from 'trained'"):
        check('[finetune]\nexport = ["ckpt"]\n')
    with pytest.raises(ConfigError, match=r"finetune\.export_dtype: .*'fp16'"):
        check('[finetune]\nexport_dtype = "float8"\n')
    with pytest.raises(ConfigError, match=r"finetune\.export: list at least one"):
        check("[finetune]\nexport = []\n")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="peak RSS is reset through /proc/self/clear_refs (Linux)")
def test_writing_needs_about_one_tensor_of_extra_memory(tmp_path) -> None:
    """128 MB of fp32 weights written as fp16 files: a cast copy of the whole would add 64 MB at
    least (safetensors' save_file adds the bytes of everything); one tensor at a time adds ~8 MB."""

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    state = {f"layer{i}.weight": torch.randn(2048, 1024) for i in range(16)}  # 16 x 8 MB
    total = sum(t.numel() * 4 for t in state.values())
    deferred = dict(state, fused=lambda: torch.cat([state["layer0.weight"][:512], state["layer1.weight"][:512]]))
    # Warm the allocator first: the first tensors' pages stay with the process (glibc keeps freed
    # heap), which would count as growth of whichever write came first.
    write_safetensors(tmp_path / "warm.safetensors", state, dtype=torch.float16)
    for write in (lambda: write_safetensors(tmp_path / "one.safetensors", deferred, dtype=torch.float16),
                  lambda: write_sharded(tmp_path / "part", "model", state, dtype=torch.float16, shard_bytes=total // 10)):
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = rss("VmRSS")
        write()
        growth = rss("VmHWM") - before
        assert growth < total / 6, f"writing grew the peak memory by {growth / 2**20:.0f} MB"
    back = load_file(str(tmp_path / "one.safetensors"))
    assert back["layer3.weight"].dtype == torch.float16 and torch.equal(back["layer3.weight"], state["layer3.weight"].half())
    assert torch.equal(back["fused"][512:], state["layer1.weight"][:512].half())
    index = json.loads((tmp_path / "part" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 6 and index["metadata"]["total_size"] == total // 2
    shard = load_file(str(tmp_path / "part" / index["weight_map"]["layer15.weight"]))
    assert torch.equal(shard["layer15.weight"], state["layer15.weight"].half())


def test_sdxl_exports_load_in_diffusers(sdxl_model_dir, tmp_path) -> None:
    """SDXL's second text encoder goes through OpenCLIP's fused layout (made one tensor at a time)."""
    from diffusers import StableDiffusionXLPipeline

    models = load_models(sdxl_model_dir)
    base = BaseWeights(models)
    with torch.no_grad():  # as a fine-tune would: change a layer of each trained part
        models.unet.mid_block.resnets[0].conv1.weight.add_(0.5)
        k_proj = next(m for n, m in models.text_encoder_2.named_modules() if n.endswith("layers.0.self_attn.k_proj"))
        k_proj.weight.mul_(1.5)  # fused into OpenCLIP's in_proj in the single file
    folder = write_diffusers_folder(models, base, tmp_path / "model", torch.float32)
    single = write_single_file(models, base, tmp_path / "model.safetensors", torch.float32)
    for pipe in (StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True),
                 StableDiffusionXLPipeline.from_single_file(str(single), config=str(sdxl_model_dir), local_files_only=True)):
        for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
            expected = getattr(models, part).state_dict()
            got = getattr(pipe, part).state_dict()
            assert got.keys() == expected.keys(), part
            for key in expected:
                assert torch.equal(got[key], expected[key]), (part, key)


def test_flux_exports_a_diffusers_folder(flux_model_dir, tmp_path) -> None:
    """A transformer family: every part (CLIP, T5, transformer, VAE, tokenizers) in FluxPipeline's folder."""
    from diffusers import FluxPipeline

    from hcp_core.models.family import build_family, family_component
    from hcp_core.plugins import get_registry

    models = build_family(family_component(str(flux_model_dir), registry=get_registry())).load(str(flux_model_dir))
    base = BaseWeights(models)
    with torch.no_grad():
        models.transformer.transformer_blocks[0].attn.to_q.weight.add_(0.5)
    pipe = FluxPipeline.from_pretrained(str(write_diffusers_folder(models, base, tmp_path / "m", torch.float32)),
                                        local_files_only=True)
    for part, module in models.modules().items():
        expected, got = module.state_dict(), getattr(pipe, part).state_dict()
        assert got.keys() == expected.keys(), part
        assert all(torch.equal(got[k], expected[k]) for k in expected), part
    with pytest.raises(ConfigError, match=r"\"single_file\": hcp writes no single-file layout for flux models"):
        check_single_file(models)
