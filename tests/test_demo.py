"""The offline demo model and data set: read back by diffusers, PIL and safetensors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hcp_core.demo.dataset import COLOURS, MASK_BACKGROUND, MASK_SHAPE, SIZES, build_demo_dataset, sample_specs
from hcp_core.demo.model import build_demo_model, is_demo_model, train_demo_tokenizer

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


@pytest.fixture(scope="module")
def pipe(demo_model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(demo_model_dir))


def read_tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------- model
def test_pipeline_runs_two_steps_at_64(pipe):
    import torch

    result = pipe(
        "a red circle, blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = result.images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and 0.0 <= image.min() <= image.max() <= 1.0
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_folder_is_a_diffusers_sd_layout(demo_model_dir):
    index = json.loads((demo_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["safety_checker"] == [None, None]
    for part in ("tokenizer/vocab.json", "tokenizer/merges.txt", *WEIGHT_FILES):
        assert (demo_model_dir / part).is_file(), part
    total = sum(p.stat().st_size for p in demo_model_dir.rglob("*") if p.is_file())
    assert total < 10 * 2**20
    assert is_demo_model(demo_model_dir) and not is_demo_model(demo_model_dir / "unet")


def test_parts_have_sd_architecture(pipe):
    import torch

    # VAE: 4 levels -> 8x downsampling, 4 latent channels.
    latents = pipe.vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor > 0
    # UNet: cross-attention with SD's module names, conditioned on the text encoder's width.
    names = {n for n, _ in pipe.unet.named_modules()}
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k", "ff.net.0.proj", "ff.net.2"):
        assert f"{block}.{leaf}" in names
    assert len([n for n in names if re.search(r"\.attn[12]$", n)]) == 14
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.max_position_embeddings == 77
    # Scheduler: SD's scaled-linear betas over 1000 steps.
    config = pipe.scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule) == (1000, "scaled_linear")
    assert (config.beta_start, config.beta_end, config.prediction_type) == (0.00085, 0.012, "epsilon")


def test_tokenizer_is_clip_style(pipe, demo_model_dir, tmp_path):
    from transformers import CLIPTokenizer

    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.tokenize("Red Circle, blue BACKGROUND") == ["red</w>", "circle</w>", ",</w>", "blue</w>", "background</w>"]
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7
    # Every byte has a token, so no text is unknown.
    assert tok.unk_token_id not in tok("zqxj ünï €")["input_ids"][1:-1]
    # vocab.json + merges.txt alone make the same tokenizer, as for CLIP's own files.
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((demo_model_dir / "tokenizer" / name).read_bytes())
    plain = CLIPTokenizer.from_pretrained(str(tmp_path))
    text = "masterpiece, 1girl, a painting of a dog on the sofa"
    assert plain(text).input_ids == tok(text).input_ids


def test_same_seed_same_weights_other_seed_differs(demo_model_dir, tmp_path):
    build_demo_model(tmp_path / "again", seed=0)
    build_demo_model(tmp_path / "other", seed=1, prediction_type="v_prediction")
    for name in WEIGHT_FILES:
        base = read_tensors(demo_model_dir / name)
        again = read_tensors(tmp_path / "again" / name)
        other = read_tensors(tmp_path / "other" / name)
        assert base.keys() == again.keys()
        assert all((base[k] == again[k]).all() for k in base), name
        assert any((base[k] != other[k]).any() for k in base if base[k].numel() > 1), name
    assert (demo_model_dir / "tokenizer/merges.txt").read_bytes() == (tmp_path / "again/tokenizer/merges.txt").read_bytes()
    scheduler = json.loads((tmp_path / "other/scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_tokenizer_training_is_the_same_in_another_process():
    code = "import json; from hcp_core.demo.model import train_demo_tokenizer as t; print(json.dumps(t()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    vocab, merges = json.loads(out)
    here_vocab, here_merges = train_demo_tokenizer()
    assert vocab == here_vocab and [tuple(m) for m in merges] == here_merges


# --------------------------------------------------------------------------- data set
def test_dataset_files_captions_and_masks(demo_data_dir):
    images = sorted(p for p in demo_data_dir.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) == 12
    assert {p.suffix for p in images} == {".png", ".jpg"}
    specs = sample_specs(12, seed=0)
    sizes = set()
    for i, (path, spec) in enumerate(zip(images, specs)):
        with Image.open(path) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
            rgb = np.asarray(im, dtype=np.int16)
        caption = path.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption == f"{spec.colour} {spec.shape}, {spec.background} background"
        # The shape's colour at its centre, the background's in a corner (JPEG: approximately).
        w, h = spec.size
        centre = rgb[int(spec.centre[1] * h), int(spec.centre[0] * w)]
        assert np.abs(centre - COLOURS[spec.colour]).max() <= 12
        assert np.abs(rgb[0, 0] - COLOURS[spec.background]).max() <= 12
        mask_path = demo_data_dir / "att_mask" / f"{path.stem}.png"
        assert mask_path.exists() == (i % 2 == 0)
        if mask_path.exists():
            with Image.open(mask_path) as mask:
                assert mask.mode == "L" and mask.size == spec.size
                m = np.asarray(mask)
            assert m[0, 0] == MASK_BACKGROUND and m[int(spec.centre[1] * h), int(spec.centre[0] * w)] == MASK_SHAPE
    assert sizes == set(SIZES)
    assert len({w / h for w, h in sizes}) == 4  # mixed aspect ratios


def test_dataset_is_deterministic(demo_data_dir, tmp_path):
    build_demo_dataset(tmp_path / "again", n_images=12, seed=0)
    build_demo_dataset(tmp_path / "other", n_images=3, seed=5)
    for path in demo_data_dir.rglob("*.*"):
        assert path.read_bytes() == (tmp_path / "again" / path.relative_to(demo_data_dir)).read_bytes(), path
    assert [p.read_text() for p in sorted((tmp_path / "other").glob("*.txt"))] != [
        p.read_text() for p in sorted(demo_data_dir.glob("*.txt"))[:3]
    ]


def test_weights_get_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    from hcp_core.fileio import default_file_mode

    old = os.umask(0o022)
    try:
        out = build_demo_model(tmp_path / "m", seed=1)
    finally:
        os.umask(old)
    for rel in WEIGHT_FILES:
        assert stat.S_IMODE(os.stat(out / rel).st_mode) == 0o644, rel
    assert default_file_mode() == 0o666 & ~old
