"""The Stable Diffusion 3 / 3.5 model family (``sd3``) on the tiny offline SD3.5 demo: detection,
loading, prompt encoding against diffusers' StableDiffusion3Pipeline, the flow-matching objective
against its formulas, and whole runs (LoRA on the transformer and CLIP-L, [sample], the exported
file read by diffusers, exact resume, cached text, the shipped example)."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hcp_core
from hcp_core.config.pipeline import build_pipeline
from hcp_core.errors import ConfigError, UserError
from hcp_core.generation.params import GenerationParams
from hcp_core.train.diffusion import sample_seed
from test_flux_family import FIXED_64, OFF, RATIO_BUCKET, TRAIN, capture_inputs, expected_sigma, refused_before_loading
from train_support import (assert_flow_load_errors, assert_meta_twin, assert_same_tensors, pipeline_toml, trained_tensors,
                           write_pipeline)

REPO = Path(__file__).resolve().parents[1]
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                  "tokenizer_3", "scheduler")


def family(**options: Any):
    from hcp_plugins.models.config import SD3Config
    from hcp_plugins.models.sd3 import SD3Family

    return SD3Family(SD3Config(**options))


@pytest.fixture(scope="module")
def sd3(sd3_model_dir):
    """The demo SD3 model loaded once for this module (read-only: tests do not train it)."""
    return family().load(str(sd3_model_dir))


def sd3_toml(model: Path, data: Path, exp: Path, *, adapters: str, bucket: str = FIXED_64, **kw: Any) -> str:
    return pipeline_toml(model, data, exp, adapters=adapters, **kw).replace(RATIO_BUCKET, bucket)


def with_model_line(text: str, model: Path, line: str) -> str:
    return text.replace(f'pretrained = "{model}"', f'pretrained = "{model}"\n{line}')


def raw_pipeline(model: Path, data: Path) -> Dict[str, Any]:
    return {"model": {"pretrained": str(model)},
            "data": {"ds": {"bucket": {"type": "fixed", "target_size": [64, 64]},
                            "sources": [{"type": "image_folder", "img_root": str(data)}]}}}


def pipeline_of(models) -> Any:
    """diffusers' StableDiffusion3Pipeline around the bundle's own modules."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**{part: getattr(models, part) for part in PIPELINE_PARTS})


# --------------------------------------------------------------------------- detection and options
def test_the_family_is_detected_from_the_folder(tmp_path, sd3_model_dir, demo_data_dir) -> None:
    text = sd3_toml(sd3_model_dir, demo_data_dir, tmp_path / "exp", adapters="")
    assert "family =" not in text
    pipeline = hcp_core.load_config(write_pipeline(tmp_path, text))
    assert pipeline.model.family.name == "sd3"
    cfg = pipeline.model.family.config
    assert (cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.mode_scale) == ("logit_normal", 0.0, 1.0, 1.29)
    assert (cfg.shift, cfg.loss_weighting, cfg.max_sequence_length) == (3.0, "none", 256)


def test_family_options_are_validated(sd3_model_dir, demo_data_dir) -> None:
    raw = raw_pipeline(sd3_model_dir, demo_data_dir)
    raw["model"]["family"] = {"type": "sd3", "shift": 1, "timestep_sampling": "mode", "loss_weighting": "sigma_sqrt",
                              "max_sequence_length": 512}
    cfg = build_pipeline(raw).model.family.config
    assert cfg.shift == 1.0 and isinstance(cfg.shift, float) and cfg.timestep_sampling == "mode"
    assert (cfg.loss_weighting, cfg.max_sequence_length) == ("sigma_sqrt", 512)
    raw["model"]["family"] = {"type": "sd3", "shift": "dynamic"}
    with pytest.raises(ConfigError, match=r"model\.family\.shift: 'dynamic'.*does not apply to SD3.*number"):
        build_pipeline(raw)
    raw["model"]["family"] = {"type": "sd3", "shift": 0.05}
    with pytest.raises(ConfigError, match="shift.*at least 0.1"):
        build_pipeline(raw)
    raw["model"]["family"] = {"type": "sd3", "max_sequence_length": 0, "guidance": 1.0}
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw)
    assert "model.family.max_sequence_length" in str(err.value) and "guidance" in str(err.value)


# --------------------------------------------------------------------------- loading
def test_load_gives_a_frozen_sd3_bundle_and_the_skeleton_matches(sd3, sd3_model_dir) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    m = sd3
    assert m.unet is None and isinstance(m.transformer, SD3Transformer2DModel) and m.denoiser is m.transformer
    assert isinstance(m.vae, AutoencoderKL) and isinstance(m.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(m.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(m.text_encoder_2, CLIPTextModelWithProjection) and isinstance(m.text_encoder_3, T5EncoderModel)
    assert m.tokenizer is not None and m.tokenizer_2 is not None and m.tokenizer_3 is not None
    assert m.text_encoder.config.hidden_size != m.text_encoder_2.config.hidden_size  # CLIP-L, CLIP-G in order
    assert (m.kind, m.prediction_type, m.source) == ("sd3", "flow_match", str(sd3_model_dir))
    assert set(m.modules()) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    for name, module in m.modules().items():
        assert not module.training, name
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters()), name
    fam = family()
    assert fam.parts == ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3") and fam.text_cache
    assert fam.latent_factor(m) == 8 and fam.size_multiple(m) == 16

    skeleton = fam.load_skeleton(str(sd3_model_dir))
    assert skeleton.kind == "sd3" and skeleton.unet is None and skeleton.tokenizer_3 is not None
    assert_meta_twin(m, skeleton, ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"))


def test_load_errors_name_the_problem(tmp_path, sd3_model_dir) -> None:
    assert_flow_load_errors(family(), sd3_model_dir, tmp_path, part="text_encoder_3", single_name="sd3.5_medium.safetensors",
                            single_message="single-file SD3.*diffusers folder.*tokenizer_3/", prediction_type="v_prediction",
                            prediction_message="prediction_type.*SD3")


def test_a_single_file_transformer_loads_with_model_config(tmp_path, sd3, sd3_model_dir) -> None:
    """As for FLUX (tests/test_flux_family.py): the transformer from the file (diffusers' names),
    the rest from model.config's folder."""
    from safetensors.torch import save_file

    state = {k: v * 1.5 if k.endswith("proj_out.weight") else v for k, v in sd3.transformer.state_dict().items()}
    single = tmp_path / "sd3-transformer.safetensors"
    save_file(state, str(single))
    models = family().load(str(single), config=str(sd3_model_dir))
    assert models.source == str(single) and models.kind == "sd3"
    assert_same_tensors(models.transformer.state_dict(), state)
    assert_same_tensors(models.text_encoder_3.state_dict(), sd3.text_encoder_3.state_dict())


# --------------------------------------------------------------------------- prompts
PROMPTS = ["a photo of a cat", "two red apples on a wooden table, soft light", ""]


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_prompt_encoder_equals_sd3_pipeline_encode_prompt(sd3, clip_skip) -> None:
    encoder = family().prompt_encoder(sd3, clip_skip=clip_skip)
    with torch.no_grad():
        encoded = encoder(PROMPTS)
    joint = sd3.text_encoder_3.config.d_model
    pooled_dim = sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    assert encoded.hidden.shape == (3, 77 + 256, joint) and encoded.pooled.shape == (3, pooled_dim)
    # diffusers' own code on the same modules (its clip_skip None is hcp's 0): exactly equal
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline_of(sd3).encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, clip_skip=clip_skip or None,
            max_sequence_length=256)  # fmt: skip
    assert torch.equal(encoded.hidden, embeds) and torch.equal(encoded.pooled, pooled)
    # the CLIP part is zero-padded beyond both CLIP widths; T5 follows it
    clip_width = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert not encoded.hidden[:, :77, clip_width:].any() and encoded.hidden[:, 77:].abs().sum() > 0


def test_clip_skip_changes_the_clip_tokens_only_and_is_bounded(sd3) -> None:
    with torch.no_grad():
        plain = family().prompt_encoder(sd3)(PROMPTS)
        skipped = family().prompt_encoder(sd3, clip_skip=1)(PROMPTS)
    assert not torch.equal(plain.hidden[:, :77], skipped.hidden[:, :77])
    assert torch.equal(plain.hidden[:, 77:], skipped.hidden[:, 77:]) and torch.equal(plain.pooled, skipped.pooled)
    layers = sd3.text_encoder.config.num_hidden_layers
    family().prompt_encoder(sd3, clip_skip=layers - 2)
    with pytest.raises(ConfigError, match=rf"model.clip_skip = {layers - 1} is out of range.*SD3.*0 and {layers - 2}"):
        family().prompt_encoder(sd3, clip_skip=layers - 1)


def test_long_prompts_are_cut_at_77_clip_tokens_and_the_t5_length(sd3, caplog) -> None:
    short = family(max_sequence_length=16).prompt_encoder(sd3)
    long_prompt = " ".join(["word"] * 100)
    ids = short.tokenize([long_prompt, "a cat"])
    assert ids["clip"].shape == ids["clip_2"].shape == (2, 77) and ids["t5"].shape == (2, 16)
    with torch.no_grad():
        encoded = short([long_prompt])
    assert encoded.hidden.shape[:2] == (1, 77 + 16)
    with torch.no_grad():
        embeds, _, _, _ = pipeline_of(sd3).encode_prompt(long_prompt, None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=16)
    assert torch.equal(encoded.hidden, embeds)
    assert "prompt cut" in caplog.text


# --------------------------------------------------------------------------- the objective
# TRAIN, capture_inputs and expected_sigma: shared with the FLUX tests (imported above).


def test_training_prediction_follows_the_flow_matching_formulas(sd3) -> None:
    import copy

    models = copy.copy(sd3)
    models.transformer = copy.deepcopy(sd3.transformer)  # the hook stays on a private copy
    seen = capture_inputs(models.transformer)
    fam = family()
    h, w = 8, 6  # latents of a 64x48 image
    x = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(1))
    ids, seed, step = [5, 9], 7, 3
    batch = {"prompts": ["a cat", "a dog"]}
    encoder = fam.prompt_encoder(models)
    with torch.no_grad():
        out = fam.training_prediction(models, encoder, batch, x, ids, seed=seed, step=step,
                                      train=TRAIN, autocast=OFF, train_text=False)
        text = encoder(batch["prompts"])
    sigmas = torch.tensor([expected_sigma(seed, step, i, 3.0) for i in ids])  # SD3's static shift 3
    noise = torch.stack([torch.randn(16, h, w, generator=torch.Generator().manual_seed(sample_seed(seed, step, i)))
                         for i in ids])
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x + s * noise
    torch.testing.assert_close(out.timesteps, sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["timestep"], sigmas * 1000, rtol=0, atol=1e-3)
    torch.testing.assert_close(seen["hidden_states"], noisy, rtol=0, atol=1e-6)
    assert torch.equal(seen["encoder_hidden_states"], text.hidden) and torch.equal(seen["pooled_projections"], text.pooled)
    torch.testing.assert_close(out.target, noise - x, rtol=0, atol=0)
    assert out.pred.shape == x.shape and out.snr is None and out.weights is None
    # the prediction is the transformer's output for those inputs, called as the pipeline calls it
    with torch.no_grad():
        direct = sd3.transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=text.hidden,
                                 pooled_projections=text.pooled, return_dict=False)[0]
    torch.testing.assert_close(out.pred, direct, rtol=0, atol=1e-5)
    # each sample depends on its id alone, not on the batch it is in
    with torch.no_grad():
        alone = fam.training_prediction(models, encoder, {"prompts": ["a dog"]}, x[1:], [9], seed=seed, step=step,
                                        train=TRAIN, autocast=OFF, train_text=False)
    assert torch.equal(alone.target[0], out.target[1]) and torch.equal(alone.timesteps[0], out.timesteps[1])
    torch.testing.assert_close(alone.pred[0], out.pred[1], rtol=0, atol=1e-5)


def test_shift_weighting_and_ddpm_options(sd3) -> None:
    fam = family(shift=1.0, loss_weighting="sigma_sqrt", timestep_sampling="uniform")
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        out = fam.training_prediction(sd3, fam.prompt_encoder(sd3), {"prompts": ["x"]}, x, [4], seed=1, step=0,
                                      train=TRAIN, autocast=OFF, train_text=False)
    u = torch.rand((1,), generator=torch.Generator().manual_seed(sample_seed(1, 0, 4, stream=3))).item()
    assert out.timesteps.item() == pytest.approx(u, abs=1e-6)
    assert out.weights.item() == pytest.approx(u ** -2, rel=1e-5)
    for train, key in ((SimpleNamespace(min_snr_gamma=5.0, noise_offset=0.0), "min_snr_gamma"),
                       (SimpleNamespace(min_snr_gamma=None, noise_offset=0.1), "noise_offset")):
        with pytest.raises(ConfigError, match=f"train.{key}.*SD3"):
            fam.training_prediction(sd3, fam.prompt_encoder(sd3), {"prompts": ["x"]}, x, [4], seed=1, step=0,
                                    train=train, autocast=OFF, train_text=False)


def test_a_ddpm_sampler_is_refused_at_set_up_and_clip_skip_is_not(tmp_path, sd3_model_dir, demo_data_dir,
                                                                   monkeypatch) -> None:
    text = sd3_toml(sd3_model_dir, demo_data_dir, tmp_path / "exp", adapters=ADAPTERS, max_steps=1)
    text = text.replace("[model]\n", "[model]\nclip_skip = 1\n", 1) + '\n[sample]\nprompts = ["x"]\nscheduler = "euler_a"\n'
    refused_before_loading(tmp_path, text, r"sample\.scheduler = 'euler_a' is a DDPM sampler; SD3", monkeypatch)
    pipeline = hcp_core.load_config(write_pipeline(tmp_path, text.replace('"euler_a"', '"euler"')))
    family().check_options(pipeline)  # clip_skip applies to SD3; "euler" names its sampler


# --------------------------------------------------------------------------- rendering
def test_render_uses_real_cfg_with_the_negative_prompt_and_checks_the_size(sd3) -> None:
    fam = family()
    encoder = fam.prompt_encoder(sd3)
    params = GenerationParams(prompt="a red square", negative_prompt="blurry", seed=5, steps=2, cfg=4.0, width=48,
                              height=32)
    first = fam.render(sd3, encoder, params, autocast=OFF)
    assert first.size == (48, 32)
    assert first.tobytes() == fam.render(sd3, encoder, params, autocast=OFF).tobytes()
    # the same as diffusers' pipeline given the prompts (it encodes them itself)
    with torch.no_grad():
        theirs = pipeline_of(sd3)("a red square", negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0,
                                  width=48, height=32, generator=torch.Generator("cpu").manual_seed(5),
                                  output_type="np").images[0]  # fmt: skip
    ours = np.asarray(first, dtype=np.float32)
    assert np.abs(ours - theirs * 255).max() <= 1.0
    other = fam.render(sd3, encoder, attrs.evolve(params, negative_prompt="a blue circle"), autocast=OFF)
    assert other.tobytes() != first.tobytes()  # the negative prompt matters (true CFG)
    with pytest.raises(UserError, match="40x32.*multiples of 16"):
        fam.render(sd3, encoder, attrs.evolve(params, width=40), autocast=OFF)


# --------------------------------------------------------------------------- whole runs
ADAPTERS = """
[[lora_transformer]]
lr = 1e-2
rank = 2
alpha = 2.0
layers = ['re:transformer_blocks\\.0\\.attn\\.to_[qv]$', 'proj_out']

[[lora_text_encoder]]
lr = 1e-2
rank = 2
layers = ['re:.*self_attn\\.q_proj$']
"""

SAMPLE = """
[sample]
prompts = ["a red square"]
negative_prompt = "blurry"
every = 0
seed = 3
steps = 2
size = "32x48"
cfg = 4.0
"""

# Only diffusers, the demo folder and the file: no hcp code. Warnings and diffusers' log go to stderr.
LOAD_IN_DIFFUSERS = textwrap.dedent(
    """
    import sys, warnings, torch
    import diffusers
    warnings.simplefilter("always")
    diffusers.utils.logging.set_verbosity_warning()
    model_dir, lora, inputs_file, out_file = sys.argv[1:5]
    inputs = torch.load(inputs_file)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(lora)
    with torch.no_grad():
        out = [pipe.transformer(**inputs["transformer"], return_dict=False)[0], pipe.text_encoder(inputs["ids"])[0]]
    torch.save(out, out_file)
    """
)


def lora_outputs_in_diffusers(model_dir: Path, lora: Path, inputs: Dict[str, Any], tmp_path: Path):
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", LOAD_IN_DIFFUSERS, str(model_dir), str(lora), str(tmp_path / "inputs.pt"),
           str(tmp_path / "out.pt")]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # CLIP-G (text_encoder_2) is not trained here: diffusers says so, which is expected
    benign = "no lora keys associated to cliptextmodelwithprojection found with the prefix='text_encoder_2'"
    lowered = "\n".join(line for line in run.stderr.lower().splitlines() if benign not in line)
    for word in ("unexpected", "missing", "inconsistency", "no lora keys", "additional target modules"):
        assert word not in lowered, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def test_lora_on_transformer_and_clip_l_trains_samples_loads_in_diffusers_and_resumes_exactly(
        tmp_path, sd3_model_dir, demo_data_dir) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for exp in (whole, resumed):
        text = sd3_toml(sd3_model_dir, demo_data_dir, exp, adapters=ADAPTERS, max_steps=3, save_every=2, masks=True,
                        extra=SAMPLE)
        write_pipeline(tmp_path, text, f"{exp.name}.toml")
    result = hcp_core.run(hcp_core.load_config(tmp_path / "whole.toml"))
    assert result.step == 3 and math.isfinite(result.last_loss)

    tensors = trained_tensors(whole)
    assert {k.split(".")[0] for k in tensors} == {"lora/transformer", "lora/text_encoder"}
    assert tensors["lora/transformer.proj_out.lora_up.weight"].abs().sum() > 0  # starts at zero
    assert Image.open(whole / "samples" / "step-3" / "00.png").size == (32, 48)

    # the exported file, read by diffusers in a fresh process: no missing or unexpected keys, and
    # the same outputs as hcp's merge of the file into the base model
    from hcp_plugins.adapters.lora.files import LoraFiles

    lora = whole / "lora.safetensors"
    merged = family().load(str(sd3_model_dir))
    layers = [k for k in tensors if k.endswith(".lora_up.weight")]
    assert len(layers) == 3 + merged.text_encoder.config.num_hidden_layers  # to_q, to_v, proj_out; every q_proj
    assert LoraFiles().apply(merged, str(lora), 1.0) == len(layers)
    g = torch.Generator().manual_seed(0)
    inputs = {"transformer": {"hidden_states": torch.randn(1, 16, 8, 8, generator=g),
                              "timestep": torch.tensor([500.0]),
                              "encoder_hidden_states": torch.randn(1, 77 + 256, 96, generator=g),
                              "pooled_projections": torch.randn(1, 80, generator=g)},
              "ids": merged.tokenizer(["a red square"], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids}  # fmt: skip
    theirs = lora_outputs_in_diffusers(sd3_model_dir, lora, inputs, tmp_path)
    with torch.no_grad():
        ours = [merged.transformer(**inputs["transformer"], return_dict=False)[0], merged.text_encoder(inputs["ids"])[0]]
        base = family().load(str(sd3_model_dir)).transformer(**inputs["transformer"], return_dict=False)[0]
    assert (ours[0] - base).abs().max() > 1e-4  # the LoRA matters
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)

    # the run that "stopped" after step 2: its checkpoint alone, resumed to the end
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    assert hcp_core.run(hcp_core.load_config(tmp_path / "resumed.toml"), resume="latest").step == 3
    assert_same_tensors(trained_tensors(whole), trained_tensors(resumed), exact=True)
    assert_same_tensors(load_file(str(lora)), load_file(str(resumed / "lora.safetensors")))


def test_a_bucket_not_a_multiple_of_16_is_refused(tmp_path, sd3_model_dir, demo_data_dir) -> None:
    text = sd3_toml(sd3_model_dir, demo_data_dir, tmp_path / "exp", adapters=ADAPTERS, max_steps=1,
                    bucket='bucket = { type = "fixed", target_size = [72, 72] }')
    with pytest.raises(UserError, match=r"data\.ds\.bucket.*72x72.*multiples of 16"):
        hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, text)))


def test_cached_text_trains_like_live_encoding(tmp_path, sd3_model_dir, demo_data_dir) -> None:
    """model.cache_text: SD3's prompt outputs have a fixed shape, so they are encoded once; the
    weights come out as with prompts encoded every step."""
    adapters = ADAPTERS.split("[[lora_text_encoder]]")[0]
    runs = {}
    for name, cache in (("cached", "true"), ("live", "false")):
        text = sd3_toml(sd3_model_dir, demo_data_dir, tmp_path / name, adapters=adapters, max_steps=2, extra=SAMPLE)
        text = with_model_line(text, sd3_model_dir, f"cache_text = {cache}\nclip_skip = 1")
        hcp_core.run(hcp_core.load_config(write_pipeline(tmp_path, text, f"{name}.toml")))
        runs[name] = trained_tensors(tmp_path / name)
    assert_same_tensors(runs["cached"], runs["live"], exact=False, atol=1e-6)
    assert (tmp_path / "cached" / "samples" / "step-2" / "00.png").is_file()
    assert "text encoder outputs of" in (tmp_path / "cached" / "train.log").read_text()


# --------------------------------------------------------------------------- the shipped example
@pytest.fixture
def demo_checkout(tmp_path, sd3_model_dir, demo_data_dir, monkeypatch) -> Path:
    """A working directory laid out like a checkout after `hcp demo --family sd3`: demo/model-sd3, demo/data, examples/."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "model-sd3").symlink_to(sd3_model_dir)
    shutil.copytree(demo_data_dir, tmp_path / "demo" / "data")
    shutil.copytree(REPO / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("plugins"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sd3_quickstart_trains_and_samples(demo_checkout) -> None:
    overrides = ["train.max_steps=4", "train.save_every=0", "sample.every=2", "sample.steps=2"]
    pipeline = hcp_core.load_config("examples/quickstart-sd3.toml", overrides)
    assert pipeline.model.family.name == "sd3"
    result = hcp_core.run(pipeline)
    exp = Path(result.exp_dir)
    assert result.step == 4 and (exp / "lora.safetensors").is_file() and math.isfinite(result.last_loss)
    for step in (2, 4):
        assert sorted(p.name for p in (exp / "samples" / f"step-{step}").iterdir()) == ["00.png", "01.png", "grid.png"]
