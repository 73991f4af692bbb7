"""An SD 1.5-architecture diffusers folder with random weights, and a tiny image dataset, for benchmarks.

Nothing is downloaded. The UNet is diffusers' ``UNet2DConditionModel`` with its defaults (the SD 1.5
block layout, ~860M parameters) and ``cross_attention_dim=768``; the VAE has SD's layout
(``block_out_channels=(128, 256, 512, 512)``, 2 ResNets per level, 4 latent channels, scaling
0.18215). The CLIP text encoder has SD 1.5's width (768, 12 heads, MLP 3072) but by default only
``TEXT_LAYERS`` transformer layers instead of 12, to keep the folder small and set-up quick
(``text_layers=12`` gives SD's depth); the tokenizer is hcp's demo BPE. Weights are seeded, so every build is identical.

The folder is written once under ``/tmp`` and reused (``ensure_model``); a marker file holding the
layout version says it is complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

#: Bump when the layout below changes, so a stale cached folder is rebuilt.
LAYOUT_VERSION = 1
TEXT_LAYERS = 2
MARKER = "hcp_bench_sd15.json"
DEFAULT_MODEL_DIR = Path("/tmp/hcp_bench_sd15")


def build_model(out: Path, text_layers: int = TEXT_LAYERS, narrow: bool = False) -> Path:
    """Write the random SD 1.5-architecture diffusers folder to ``out`` (replacing it); return ``out``.

    ``text_layers``: transformer layers of the CLIP text encoder (SD 1.5: 12). ``narrow``: every
    block and layer of that layout (so the same operations per step) at a few dozen channels
    (~2.4M UNet parameters), for counting a step's operations on a CPU (bench_gpu.py --narrow)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hcp_core.demo.model import BOS_TOKEN, EOS_TOKEN, ddpm_scheduler, save_demo_tokenizer, train_demo_tokenizer

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab, merges = train_demo_tokenizer()
    tokenizer = save_demo_tokenizer(out / "tokenizer", vocab, merges)
    torch.manual_seed(0)
    width = 32 if narrow else 768
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
        num_attention_heads=4 if narrow else 12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=width, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN],
    ))
    narrow_unet = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8) if narrow else {}
    unet = UNet2DConditionModel(cross_attention_dim=width, **narrow_unet)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16) if narrow else (128, 256, 512, 512),
        norm_num_groups=8 if narrow else 32,
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.18215,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=ddpm_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / MARKER).write_text(json.dumps({"version": LAYOUT_VERSION, "text_layers": text_layers, "narrow": narrow}) + "\n")
    return out


def ensure_model(out: Path = DEFAULT_MODEL_DIR, text_layers: int = TEXT_LAYERS, narrow: bool = False) -> Path:
    """The model folder at ``out``, built first if it is missing, from another layout version or
    with other ``text_layers`` / ``narrow``."""
    marker = out / MARKER
    try:
        found = json.loads(marker.read_text())
        if (found["version"] == LAYOUT_VERSION and found.get("text_layers", TEXT_LAYERS) == text_layers
                and found.get("narrow", False) == narrow):
            return out
    except (OSError, ValueError, KeyError):
        pass
    return build_model(out, text_layers, narrow)


def write_images(root: Path, count: int, size: int = 256, seed: int = 0) -> List[Path]:
    """``count`` ``size``x``size`` PNG images (smooth gradients + noise) with a ``.txt`` caption each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0, 255, size=3)
        base = np.stack([xx * a, yy * b, (xx + yy) / 2 * c], axis=-1)
        pixels = np.clip(base + rng.normal(0, 10, size=base.shape), 0, 255).astype(np.uint8)
        path = root / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        (root / f"img{i:02d}.txt").write_text(f"a photo of a {colours[i % len(colours)]} gradient, detailed")
        paths.append(path)
    return paths
