"""The tiny offline FLUX.1 and SD3.5 demo models: read back by diffusers' own pipelines, end to end."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hcp_core.demo.flow import T5_EOS_TOKEN, T5_PAD_TOKEN, train_demo_t5_vocab
from hcp_core.demo.flux import build_demo_flux_model
from hcp_core.demo.model import MARKER_FILE, is_demo_model
from hcp_core.demo.sd3 import build_demo_sd3_model

PROMPT = "a red circle, blue background"


def weight_files(folder: Path):
    return sorted(p.relative_to(folder) for p in folder.glob("*/*.safetensors"))


def generate(pipe, **kwargs):
    import torch

    result = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    image = result.images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and 0.0 <= image.min() <= image.max() <= 1.0
    return image


@pytest.fixture(scope="module")
def flux_pipe(flux_model_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(flux_model_dir))


@pytest.fixture(scope="module")
def sd3_pipe(sd3_model_dir):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(sd3_model_dir))


# --------------------------------------------------------------------------- FLUX.1
def test_flux_folder_is_a_diffusers_flux_layout(flux_model_dir):
    index = json.loads((flux_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"][1] in ("T5Tokenizer", "T5TokenizerFast")
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert [str(p) for p in weight_files(flux_model_dir)] == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    total = sum(p.stat().st_size for p in flux_model_dir.rglob("*") if p.is_file())
    assert total < 5 * 2**20
    assert is_demo_model(flux_model_dir)
    marker = json.loads((flux_model_dir / MARKER_FILE).read_text())
    assert marker["kind"] == "flux" and marker["guidance"] is True


def test_flux_pipeline_runs_two_steps_at_64(flux_pipe):
    generate(flux_pipe, guidance_scale=3.5)


def test_flux_parts_have_flux_architecture(flux_pipe):
    import torch

    config = flux_pipe.transformer.config
    assert config.in_channels == 64 and config.guidance_embeds
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert config.joint_attention_dim == flux_pipe.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == flux_pipe.text_encoder.config.hidden_size
    vae = flux_pipe.vae
    assert vae.config.latent_channels == 16 and not vae.config.use_quant_conv and not vae.config.use_post_quant_conv
    assert vae.config.scaling_factor > 0 and vae.config.shift_factor is not None
    assert vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean.shape == (1, 16, 8, 12)
    scheduler = flux_pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
    assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    assert (scheduler.base_image_seq_len, scheduler.max_image_seq_len) == (256, 4096)

    prompt_embeds, pooled, text_ids = flux_pipe.encode_prompt(PROMPT, max_sequence_length=32)
    assert prompt_embeds.shape == (1, 32, config.joint_attention_dim)
    assert pooled.shape == (1, config.pooled_projection_dim)
    assert text_ids.shape == (32, 3)


def test_flux_schnell_style_without_guidance(tmp_path):
    from diffusers import FluxPipeline

    out = build_demo_flux_model(tmp_path / "schnell", guidance=False)
    pipe = FluxPipeline.from_pretrained(str(out))
    assert not pipe.transformer.config.guidance_embeds
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0
    assert json.loads((out / MARKER_FILE).read_text())["guidance"] is False
    generate(pipe, guidance_scale=0.0)


# --------------------------------------------------------------------------- SD3.5
def test_sd3_folder_is_a_diffusers_sd3_layout(sd3_model_dir):
    index = json.loads((sd3_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_3"][1] in ("T5Tokenizer", "T5TokenizerFast")
    assert len(weight_files(sd3_model_dir)) == 5
    total = sum(p.stat().st_size for p in sd3_model_dir.rglob("*") if p.is_file())
    assert total < 5 * 2**20
    assert json.loads((sd3_model_dir / MARKER_FILE).read_text())["kind"] == "sd3"


def test_sd3_pipeline_runs_two_steps_at_64(sd3_pipe):
    generate(sd3_pipe, guidance_scale=5.0)


def test_sd3_parts_fit_together_as_in_sd3(sd3_pipe):
    te1, te2, te3 = sd3_pipe.text_encoder, sd3_pipe.text_encoder_2, sd3_pipe.text_encoder_3
    config = sd3_pipe.transformer.config
    assert te1.config.hidden_size != te2.config.hidden_size  # an order mix-up fails loudly
    assert config.pooled_projection_dim == te1.config.projection_dim + te2.config.projection_dim
    # The CLIP hidden states are zero-padded up to the T5 width, as on the real model.
    assert te1.config.hidden_size + te2.config.hidden_size < te3.config.d_model == config.joint_attention_dim
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    assert config.in_channels == config.out_channels == 16 and config.qk_norm == "rms_norm"
    assert sd3_pipe.tokenizer_2.pad_token == "!"
    assert sd3_pipe.vae.config.latent_channels == 16 and not sd3_pipe.vae.config.use_quant_conv
    assert not sd3_pipe.scheduler.config.use_dynamic_shifting and sd3_pipe.scheduler.config.shift == 3.0

    embeds, _, pooled, _ = sd3_pipe.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=32
    )
    assert embeds.shape == (1, 77 + 32, config.joint_attention_dim)
    assert pooled.shape == (1, config.pooled_projection_dim)


# --------------------------------------------------------------------------- T5 tokenizer
def test_t5_tokenizer_is_t5_style(flux_model_dir, sd3_model_dir, flux_pipe):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(flux_model_dir / "tokenizer_2"))
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id) == (T5_PAD_TOKEN, 0, T5_EOS_TOKEN, 1)
    assert tok.model_max_length == 512
    assert tok.tokenize("a red circle, blue background") == ["▁a", "▁red", "▁circle", ",", "▁blue", "▁background"]
    ids = tok("a photo of a cat").input_ids
    assert ids[-1] == tok.eos_token_id and len(ids) == 6 and tok.unk_token_id not in ids
    # Unknown words and capitals are spelt out, never unknown; decoding gives the text back.
    text = "Zqxj 42 quokka!"
    assert tok.unk_token_id not in tok(text).input_ids
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    padded = tok(PROMPT, padding="max_length", max_length=32, truncation=True).input_ids
    assert len(padded) == 32 and padded[padded.index(1) + 1 :] == [0] * (31 - padded.index(1))
    # The pipeline's own tokenizer and AutoTokenizer read the same files the same way; SD3's is the same.
    assert flux_pipe.tokenizer_2(PROMPT).input_ids == tok(PROMPT).input_ids
    assert AutoTokenizer.from_pretrained(str(flux_model_dir / "tokenizer_2"))(PROMPT).input_ids == tok(PROMPT).input_ids
    assert (flux_model_dir / "tokenizer_2/tokenizer.json").read_bytes() == (
        sd3_model_dir / "tokenizer_3/tokenizer.json"
    ).read_bytes()
    assert len(tok) <= flux_pipe.text_encoder_2.config.vocab_size


def test_t5_vocab_is_the_same_in_another_process():
    code = "import json; from hcp_core.demo.flow import train_demo_t5_vocab as t; print(json.dumps(t()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert [tuple(v) for v in json.loads(out)] == train_demo_t5_vocab()


# --------------------------------------------------------------------------- both
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_same_seed_same_bytes_other_seed_differs(family, flux_model_dir, sd3_model_dir, tmp_path):
    from safetensors.torch import load_file

    if family == "flux":
        build, base = build_demo_flux_model, flux_model_dir
    else:
        build, base = build_demo_sd3_model, sd3_model_dir
    again = build(tmp_path / "again", seed=0)
    other = build(tmp_path / "other", seed=1)
    files = sorted(p.relative_to(base) for p in base.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (base / rel).read_bytes() == (again / rel).read_bytes(), rel
    for rel in weight_files(base):
        a, b = load_file(str(base / rel)), load_file(str(other / rel))
        assert any((a[k] != b[k]).any() for k in a if a[k].numel() > 1), rel


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_weights_get_the_umask_mode(family, tmp_path):
    build = build_demo_flux_model if family == "flux" else build_demo_sd3_model
    old = os.umask(0o022)
    try:
        out = build(tmp_path / family, seed=2)
    finally:
        os.umask(old)
    for rel in weight_files(out):
        assert stat.S_IMODE(os.stat(out / rel).st_mode) == 0o644, rel
