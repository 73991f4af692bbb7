"""The FLUX.1 model family (``flux``) on the tiny offline FLUX demo: detection, loading, prompt
encoding against diffusers' FluxPipeline, the flow-matching objective against its formulas, and
whole runs (fine-tune + LoRA on the transformer, attention masks, [sample], exact resume)."""
from __future__ import annotations

import contextlib
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hcp_core
from hcp_core.config.pipeline import build_pipeline
from hcp_core.errors import ConfigError, UserError
from hcp_core.generation.params import GenerationParams
from hcp_core.models.loading import ModelLoadError
from hcp_core.train.diffusion import sample_seed
from train_support import (assert_flow_load_errors, assert_meta_twin, assert_same_tensors, pipeline_toml, trained_tensors,
                           write_pipeline)

RATIO_BUCKET = 'bucket = { type = "ratio", from = "images", target_area = 4096, step = 8, num_buckets = 2 }'
FIXED_64 = 'bucket = { type = "fixed", target_size = [64, 64] }'
#: What the loop passes as ``autocast`` (accelerate's), without mixed precision.
OFF = contextlib.nullcontext


def family(**options: Any):
    from hcp_plugins.models.config import FluxConfig
    from hcp_plugins.models.flux import FluxFamily

    return FluxFamily(FluxConfig(**options))


@pytest.fixture(scope="module")
def flux(flux_model_dir):
    """The demo FLUX model loaded once for this module (read-only: tests do not train it)."""
    return family().load(str(flux_model_dir))


def flux_toml(model: Path, data: Path, exp: Path, *, adapters: str, bucket: str = FIXED_64, **kw: Any) -> str:
    return pipeline_toml(model, data, exp, adapters=adapters, **kw).replace(RATIO_BUCKET, bucket)


def raw_pipeline(model: Path, data: Path, family_line: str = "") -> Dict[str, Any]:
    return {"model": {"pretrained": str(model), **({"family": family_line} if family_line else {})},
            "data": {"ds": {"bucket": {"type": "fixed", "target_size": [64, 64]},
                            "sources": [{"type": "image_folder", "img_root": str(data)}]}}}


# --------------------------------------------------------------------------- detection and options
def test_the_family_is_detected_from_the_folder(tmp_path, flux_model_dir, demo_data_dir) -> None:
    text = flux_toml(flux_model_dir, demo_data_dir, tmp_path / "exp", adapters="")
    assert "family =" not in text
    pipeline = hcp_core.load_config(write_pipeline(tmp_path, text))
    assert pipeline.model.family.name == "flux"
    cfg = pipeline.model.family.config
    assert (cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.mode_scale) == ("logit_normal", 0.0, 1.0, 1.29)
    assert (cfg.shift, cfg.loss_weighting, cfg.guidance, cfg.max_sequence_length) == ("dynamic", "none", 1.0, 512)


def test_family_options_are_validated(flux_model_dir, demo_data_dir) -> None:
    raw = raw_pipeline(flux_model_dir, demo_data_dir)
    raw["model"]["family"] = {"type": "flux", "shift": 3, "timestep_sampling": "mode", "loss_weighting": "cosmap"}
    cfg = build_pipeline(raw).model.family.config
    assert cfg.shift == 3.0 and isinstance(cfg.shift, float) and cfg.timestep_sampling == "mode"
    raw["model"]["family"] = "flux"
    assert build_pipeline(raw).model.family.config.shift == "dynamic"
    raw["model"]["family"] = {"type": "flux", "max_sequence_length": 513, "timestep_sampling": "sigmoid"}
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw)
    text = str(err.value)
    assert "model.family.max_sequence_length" in text and "513" in text
    assert "timestep_sampling" in text and "'logit_normal'" in text
    raw["model"]["family"] = {"type": "flux", "shift": "dynamc"}
    with pytest.raises(ConfigError, match=r"model\.family\.shift: .*'dynamic'.*got 'dynamc'"):
        build_pipeline(raw)
    raw["model"]["family"] = {"type": "flux", "shift": 0.05}
    with pytest.raises(ConfigError, match="shift.*at least 0.1"):
        build_pipeline(raw)


# --------------------------------------------------------------------------- loading
def test_load_gives_a_frozen_flux_bundle_and_the_skeleton_matches(flux, flux_model_dir) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    m = flux
    assert m.unet is None and isinstance(m.transformer, FluxTransformer2DModel) and m.denoiser is m.transformer
    assert isinstance(m.vae, AutoencoderKL) and isinstance(m.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(m.text_encoder, CLIPTextModel) and isinstance(m.text_encoder_2, T5EncoderModel)
    assert m.tokenizer is not None and m.tokenizer_2 is not None
    assert (m.kind, m.prediction_type, m.source) == ("flux", "flow_match", str(flux_model_dir))
    for name, module in m.modules().items():
        assert not module.training, name
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters()), name
    fam = family()
    assert fam.parts == ("transformer", "text_encoder", "text_encoder_2")
    assert fam.latent_factor(m) == 8 and fam.size_multiple(m) == 16

    skeleton = fam.load_skeleton(str(flux_model_dir))
    assert skeleton.kind == "flux" and skeleton.unet is None
    assert_meta_twin(m, skeleton, ("transformer", "vae", "text_encoder", "text_encoder_2"))


def test_load_errors_name_the_problem(tmp_path, flux_model_dir) -> None:
    assert_flow_load_errors(family(), flux_model_dir, tmp_path, part="text_encoder_2", single_name="flux1-dev.safetensors",
                            single_message="single-file FLUX.*diffusers folder", prediction_type="epsilon",
                            prediction_message="prediction_type")


def test_a_single_file_transformer_loads_with_model_config(tmp_path, flux, flux_model_dir, demo_data_dir) -> None:
    """``model.pretrained`` = a transformer checkpoint, ``model.config`` = the diffusers folder of
    the rest: the family is detected from the folder and the transformer's weights are the file's.
    (The file has diffusers' names: diffusers' converter of BFL's layout assumes FLUX.1's real
    width, 3072, so a tiny model cannot be written in BFL's layout.)"""
    import io

    from safetensors.torch import save_file

    from hcp_core.train.preflight import check_model

    state = {k: v + 0.25 if k.endswith("proj_out.weight") else v for k, v in flux.transformer.state_dict().items()}
    single = tmp_path / "flux-transformer.safetensors"
    save_file(state, str(single))
    text = flux_toml(single, demo_data_dir, tmp_path / "exp", adapters=ADAPTERS, max_steps=1)
    text = text.replace(f'pretrained = "{single}"', f'pretrained = "{single}"\nconfig = "{flux_model_dir}"')
    pipeline = hcp_core.load_config(write_pipeline(tmp_path, text))
    assert pipeline.model.family.name == "flux"
    fam = pipeline.model.family.build()
    models = fam.load(str(single), config=str(flux_model_dir))
    assert models.source == str(single) and not models.transformer.training
    assert_same_tensors(models.transformer.state_dict(), state)
    assert_same_tensors(models.text_encoder.state_dict(), flux.text_encoder.state_dict())
    assert_meta_twin(models, fam.load_skeleton(str(single), config=str(flux_model_dir)), ("transformer", "vae"))
    out = io.StringIO()
    assert check_model(pipeline, out)[0], out.getvalue()
    with pytest.raises(ModelLoadError, match=r"single-file FLUX checkpoint.*Set model\.config \(hcp generate: --model-config\)"):
        fam.load(str(single))
    wrong = tmp_path / "vae.safetensors"
    save_file(flux.vae.state_dict(), str(wrong))
    with pytest.raises(ModelLoadError, match=r"could not read '.*vae\.safetensors' as a FLUX transformer"):
        fam.load(str(wrong), config=str(flux_model_dir))


def test_fp8_base_stores_frozen_linear_weights_in_8_bits(flux_model_dir, monkeypatch) -> None:
    """model.fp8_base (through place_models): frozen Linear weights become float8_e4m3fn (half the
    bytes of bf16), trained ones stay; the transformer computes what the same model computes in fp32
    with each of those weights rounded to fp8 once."""
    import copy

    from hcp_core.config.schema import ModelConfig
    from hcp_core.models.fp8_storage import store_linears_in_fp8
    from hcp_core.train.setup import place_models
    from test_lora_transformer import flux_inputs

    models = family().load(str(flux_model_dir))
    tr = models.transformer
    tr.proj_out.weight.requires_grad_(True)  # as a fine-tuned layer: never stored in 8 bits
    frozen = {n: m for n, m in tr.named_modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad}
    reference = copy.deepcopy(tr)
    with torch.no_grad():
        for name in frozen:
            w = reference.get_submodule(name).weight
            w.copy_(w.to(torch.float8_e4m3fn).float())
    inputs = {k: v for k, v in flux_inputs(models).items() if k != "ids"}
    with torch.no_grad():
        exact = tr(**inputs, return_dict=False)[0]
    place_models(models, torch.device("cpu"), ModelConfig(pretrained="unused", fp8_base=True), "no")
    assert {m.weight.dtype for m in frozen.values()} == {torch.float8_e4m3fn}
    assert tr.proj_out.weight.dtype == torch.float32 and tr.norm_out.linear.bias.dtype == torch.float32
    bf16_bytes = sum(m.weight.numel() * 2 for m in frozen.values())
    assert sum(m.weight.nbytes for m in frozen.values()) * 2 == bf16_bytes
    with torch.no_grad():
        out = tr(**inputs, return_dict=False)[0]
        expected = reference(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert 0 < (out - exact).norm() / exact.norm() < 0.1  # rounded once, not otherwise changed
    assert store_linears_in_fp8(tr) == 0  # already stored
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(UserError, match=r"model\.fp8_base = true needs torch\.float8_e4m3fn.*fp8_base = false"):
        store_linears_in_fp8(copy.deepcopy(reference))


# --------------------------------------------------------------------------- prompts
PROMPTS = ["a photo of a cat", "two red apples on a wooden table, soft light", ""]


def test_prompt_encoder_equals_flux_pipeline_encode_prompt(flux, flux_model_dir) -> None:
    from diffusers import FluxPipeline

    encoded = family().prompt_encoder(flux)(PROMPTS)
    assert encoded.hidden.shape == (3, 512, flux.text_encoder_2.config.d_model)
    assert encoded.pooled.shape == (3, flux.text_encoder.config.hidden_size)
    # diffusers' own code on the same modules: exactly equal
    same = FluxPipeline(scheduler=flux.scheduler, vae=flux.vae, text_encoder=flux.text_encoder, tokenizer=flux.tokenizer,
                        text_encoder_2=flux.text_encoder_2, tokenizer_2=flux.tokenizer_2, transformer=flux.transformer)
    with torch.no_grad():
        embeds, pooled, text_ids = same.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
    assert torch.equal(encoded.hidden, embeds) and torch.equal(encoded.pooled, pooled)
    assert text_ids.shape == (512, 3) and not text_ids.any()
    # diffusers loading the folder itself (its own modules: float rounding of the attention only)
    theirs = FluxPipeline.from_pretrained(str(flux_model_dir), local_files_only=True)
    with torch.no_grad():
        embeds, pooled, _ = theirs.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
    torch.testing.assert_close(encoded.hidden, embeds, rtol=0, atol=1e-4)
    torch.testing.assert_close(encoded.pooled, pooled, rtol=0, atol=1e-6)


def test_prompt_encoder_options_and_clip_skip(flux) -> None:
    short = family(max_sequence_length=16).prompt_encoder(flux)
    long_prompt = " ".join(["word"] * 40)
    with torch.no_grad():
        encoded = short([long_prompt, "a cat"])
    assert encoded.hidden.shape[:2] == (2, 16)
    ids = short.tokenize([long_prompt])
    assert ids["clip"].shape == (1, 77) and ids["t5"].shape == (1, 16)
    with pytest.raises(ConfigError, match=r"model.clip_skip = 1.*FLUX"):
        family().prompt_encoder(flux, clip_skip=1)


# --------------------------------------------------------------------------- the objective
TRAIN = SimpleNamespace(min_snr_gamma=None, noise_offset=0.0)


def capture_inputs(transformer) -> Dict[str, Any]:
    """The keyword arguments of the transformer's next calls (last one kept)."""
    seen: Dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def expected_sigma(seed: int, step: int, sid: int, shift: float) -> float:
    """logit-normal(0, 1) sigma, shifted: the formulas, not the helpers."""
    g = torch.Generator().manual_seed(sample_seed(seed, step, sid, stream=3))
    u = torch.sigmoid(torch.normal(mean=0.0, std=1.0, size=(1,), generator=g)).item()
    return shift * u / (1 + (shift - 1) * u)


def test_training_prediction_follows_the_flow_matching_formulas(flux) -> None:
    import copy

    models = copy.copy(flux)
    models.transformer = copy.deepcopy(flux.transformer)  # the hook stays on a private copy
    seen = capture_inputs(models.transformer)
    fam = family()
    h, w = 8, 6  # latents of a 64x48 image
    x = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(1))
    ids, seed, step = [5, 9], 7, 3
    batch = {"prompts": ["a cat", "a dog"]}
    with torch.no_grad():
        out = fam.training_prediction(models, fam.prompt_encoder(models), batch, x, ids, seed=seed, step=step,
                                      train=TRAIN, autocast=OFF, train_text=False)
    mu = (1.15 - 0.5) / (4096 - 256) * ((h // 2) * (w // 2) - 256) + 0.5  # FLUX's calculate_shift
    sigmas = torch.tensor([expected_sigma(seed, step, i, math.exp(mu)) for i in ids])
    noise = torch.stack([torch.randn(16, h, w, generator=torch.Generator().manual_seed(sample_seed(seed, step, i)))
                         for i in ids])
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x + s * noise
    packed = noisy.view(2, 16, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, (h // 2) * (w // 2), 64)
    torch.testing.assert_close(out.timesteps, sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["timestep"], sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["hidden_states"], packed, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.target, noise - x, rtol=0, atol=0)
    assert out.pred.shape == x.shape and out.snr is None and out.weights is None
    assert torch.equal(seen["guidance"], torch.ones(2))  # dev-style: the guidance embedding is fed
    assert seen["img_ids"].shape == ((h // 2) * (w // 2), 3) and torch.equal(seen["img_ids"][w // 2 + 1], torch.tensor([0.0, 1, 1]))
    assert seen["txt_ids"].shape == (512, 3) and seen["encoder_hidden_states"].shape[:2] == (2, 512)
    # each sample depends on its id alone, not on the batch it is in
    with torch.no_grad():
        alone = fam.training_prediction(models, fam.prompt_encoder(models), {"prompts": ["a dog"]}, x[1:], [9],
                                        seed=seed, step=step, train=TRAIN, autocast=OFF,
                                        train_text=False)
    assert torch.equal(alone.target[0], out.target[1]) and torch.equal(alone.timesteps[0], out.timesteps[1])
    torch.testing.assert_close(alone.pred[0], out.pred[1], rtol=0, atol=1e-5)


def test_static_shift_weighting_and_ddpm_options(flux) -> None:
    fam = family(shift=3.0, loss_weighting="cosmap", timestep_sampling="uniform", guidance=3.5)
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        out = fam.training_prediction(flux, fam.prompt_encoder(flux), {"prompts": ["x"]}, x, [4], seed=1, step=0,
                                      train=TRAIN, autocast=OFF, train_text=False)
    u = torch.rand((1,), generator=torch.Generator().manual_seed(sample_seed(1, 0, 4, stream=3))).item()
    sigma = 3 * u / (1 + 2 * u)
    assert out.timesteps.item() == pytest.approx(sigma, abs=1e-6)
    assert out.weights.item() == pytest.approx(2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)), rel=1e-5)
    for train, key in ((SimpleNamespace(min_snr_gamma=5.0, noise_offset=0.0), "min_snr_gamma"),
                       (SimpleNamespace(min_snr_gamma=None, noise_offset=0.1), "noise_offset")):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            fam.training_prediction(flux, fam.prompt_encoder(flux), {"prompts": ["x"]}, x, [4], seed=1, step=0,
                                    train=train, autocast=OFF, train_text=False)


def test_schnell_style_models_get_no_guidance(tmp_path) -> None:
    from hcp_core.demo.flux import build_demo_flux_model

    models = family().load(str(build_demo_flux_model(tmp_path / "schnell", guidance=False)))
    assert not models.transformer.config.guidance_embeds
    seen = capture_inputs(models.transformer)
    fam = family(guidance=3.5)
    with torch.no_grad():
        out = fam.training_prediction(models, fam.prompt_encoder(models), {"prompts": ["x"]}, torch.randn(1, 16, 4, 4), [0],
                                      seed=0, step=0, train=TRAIN, autocast=OFF,
                                      train_text=False)
    assert seen["guidance"] is None and out.pred.shape == (1, 16, 4, 4)
    image = fam.render(models, fam.prompt_encoder(models), GenerationParams(prompt="x", seed=1, steps=2, width=32, height=32),
                       autocast=OFF)
    assert image.size == (32, 32)


# --------------------------------------------------------------------------- rendering
def test_render_is_seeded_and_checks_the_size(flux) -> None:
    fam = family()
    encoder = fam.prompt_encoder(flux)
    off = OFF
    params = GenerationParams(prompt="a red square", negative_prompt="ignored", seed=5, steps=2, cfg=3.5, width=48, height=32)
    first = fam.render(flux, encoder, params, autocast=off)
    assert first.size == (48, 32)
    assert first.tobytes() == fam.render(flux, encoder, params, autocast=off).tobytes()
    import attrs

    with pytest.raises(UserError, match="40x32.*multiples of 16"):
        fam.render(flux, encoder, attrs.evolve(params, width=40), autocast=off)


# --------------------------------------------------------------------------- whole runs
ADAPTERS = """
[[transformer]]
lr = 1e-2
layers = ['re:.*norm_out\\.linear$']

[[lora_transformer]]
lr = 1e-2
rank = 2
alpha = 2.0
layers = ['re:transformer_blocks\\.0\\.attn\\.to_q$']
"""

SAMPLE = """
[sample]
prompts = ["a red square"]
every = 0
seed = 3
steps = 2
size = "32x48"
cfg = 3.5
"""


def test_finetune_and_lora_on_the_transformer_train_sample_and_resume_exactly(tmp_path, flux_model_dir, demo_data_dir) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for exp in (whole, resumed):
        text = flux_toml(flux_model_dir, demo_data_dir, exp, adapters=ADAPTERS, max_steps=3, save_every=2, masks=True,
                         extra=SAMPLE)
        write_pipeline(tmp_path, text, f"{exp.name}.toml")
    result = hcp_core.run(hcp_core.load_config(tmp_path / "whole.toml"))
    assert result.step == 3 and math.isfinite(result.last_loss)

    tensors = trained_tensors(whole)
    assert sorted(tensors) == [
        "finetune/transformer.norm_out.linear.bias", "finetune/transformer.norm_out.linear.weight",
        "lora/transformer.transformer_blocks.0.attn.to_q.lora_down.weight",
        "lora/transformer.transformer_blocks.0.attn.to_q.lora_up.weight",
    ]
    base = family().load(str(flux_model_dir)).transformer.norm_out.linear
    assert not torch.equal(tensors["finetune/transformer.norm_out.linear.weight"], base.weight)
    assert tensors["lora/transformer.transformer_blocks.0.attn.to_q.lora_up.weight"].abs().sum() > 0  # starts at zero
    assert sorted(load_file(str(whole / "finetune.safetensors"))) == ["transformer.norm_out.linear.bias",
                                                                        "transformer.norm_out.linear.weight"]
    assert (whole / "lora.safetensors").is_file()

    sample = Image.open(whole / "samples" / "step-3" / "00.png")
    assert sample.size == (32, 48)

    # the run that "stopped" after step 2: its checkpoint alone, resumed to the end
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    assert hcp_core.run(hcp_core.load_config(tmp_path / "resumed.toml"), resume="latest").step == 3
    assert_same_tensors(trained_tensors(whole), trained_tensors(resumed), exact=True)
    assert_same_tensors(load_file(str(whole / "finetune.safetensors")), load_file(str(resumed / "finetune.safetensors")))
    assert_same_tensors(load_file(str(whole / "lora.safetensors")), load_file(str(resumed / "lora.safetensors")))


def test_a_bucket_not_a_multiple_of_16_is_refused(tmp_path, flux_model_dir, demo_data_dir) -> None:
    text = flux_toml(flux_model_dir, demo_data_dir, tmp_path / "exp", adapters=ADAPTERS, max_steps=1,
                     bucket='bucket = { type = "fixed", target_size = [72, 72] }')
    with pytest.raises(UserError, match=r"data\.ds\.bucket.*72x72.*multiples of 16"):
        hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, text)))


#: Options that do not apply to flow matching: (TOML lines, section, what the message must say).
DDPM_ONLY = [
    ("clip_skip = 1", "model", r"model\.clip_skip = 1 does not apply to FLUX.*set it to 0"),
    ('prediction_type = "v_prediction"', "model", r"model\.prediction_type = 'v_prediction' does not apply to FLUX"),
    ("min_snr_gamma = 5.0", "train", r"train\.min_snr_gamma.*FLUX.*loss_weighting"),
    ("noise_offset = 0.05", "train", r"train\.noise_offset.*FLUX.*timestep_sampling"),
    ('scheduler = "dpm++_2m"', "sample", r"sample\.scheduler = 'dpm\+\+_2m' is a DDPM sampler; FLUX.*\"euler\""),
]


def refused_before_loading(tmp_path: Path, toml_text: str, message: str, monkeypatch) -> None:
    """``hcp check`` reports ``message`` and ``hcp run`` stops with it before any weight is read
    (the family's ``load`` fails the test if called)."""
    import io

    from hcp_core.train.preflight import check_pipeline

    pipeline = hcp_core.load_config(write_pipeline(tmp_path, toml_text))
    out = io.StringIO()
    assert check_pipeline(pipeline, out=out, check_model_layers=True, verify_images=False) is False
    assert re.search(f"model: ERROR: .*{message}", out.getvalue()), out.getvalue()
    cls = type(pipeline.model.family.build())
    monkeypatch.setattr(cls, "load", lambda *a, **k: pytest.fail("the model loaded before the option was refused"))
    with pytest.raises(UserError, match=message):
        hcp_core.run(pipeline)


@pytest.mark.parametrize("line,section,message", DDPM_ONLY, ids=[d[0].split(" ")[0] for d in DDPM_ONLY])
def test_ddpm_only_options_are_refused_at_set_up_and_by_check(tmp_path, flux_model_dir, demo_data_dir, monkeypatch,
                                                             line, section, message) -> None:
    text = flux_toml(flux_model_dir, demo_data_dir, tmp_path / "exp", adapters=ADAPTERS, max_steps=1)
    text = text + '\n[sample]\nprompts = ["x"]\n' if section == "sample" else text
    text = text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
    refused_before_loading(tmp_path, text, message, monkeypatch)


def test_cached_text_trains_like_live_encoding(tmp_path, flux_model_dir, demo_data_dir) -> None:
    """model.cache_text: FLUX's prompt outputs have a fixed shape, so they are encoded once; the
    weights come out as with prompts encoded every step."""
    adapters = ADAPTERS.split("[[lora_transformer]]")[0]
    runs = {}
    for name, cache in (("cached", "true"), ("live", "false")):
        text = flux_toml(flux_model_dir, demo_data_dir, tmp_path / name, adapters=adapters, max_steps=2, extra=SAMPLE)
        text = text.replace(f'pretrained = "{flux_model_dir}"', f'pretrained = "{flux_model_dir}"\ncache_text = {cache}')
        hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, text, f"{name}.toml")))
        runs[name] = trained_tensors(tmp_path / name)
    assert_same_tensors(runs["cached"], runs["live"], exact=True)
    assert (tmp_path / "cached" / "samples" / "step-2" / "00.png").is_file()
