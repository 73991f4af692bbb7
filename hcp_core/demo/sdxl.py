"""A tiny Stable Diffusion XL model, written offline, for the SDXL quickstart and tests.

It has SDXL's layout and conditioning with a few MB of random weights:

* two CLIP text encoders, the second with a text projection (its projected pooled output is the
  UNet's ``text_embeds``), and their tokenizers (the second pads with "!", as SDXL's does);
* a UNet with ``addition_embed_type = "text_time"``: its cross-attention width is the two
  encoders' hidden sizes added (their hidden states are concatenated), and its added embedding
  takes the pooled text embedding plus six size/crop numbers (``add_time_ids``);
* SD's 8x VAE and DDPM noise schedule.

The two encoders have *different* widths on purpose, so a mix-up of their order fails loudly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .model import (
    _seeded,
    calibrated_vae,
    ddpm_scheduler,
    new_demo_folder,
    save_demo_pipeline,
    save_demo_tokenizer,
    tiny_text_encoder,
    tiny_unet,
    train_demo_tokenizer,
)

#: Hidden widths of the two tiny text encoders (SDXL: 768 and 1280).
HIDDEN_1 = 32
HIDDEN_2 = 48
#: Width of each of the six sinusoidal size/crop embeddings (SDXL: 256).
ADDITION_TIME_EMBED_DIM = 8
#: SDXL's second tokenizer pads with "!" instead of the end token.
PAD_TOKEN_2 = "!"


def tiny_sdxl_unet(*, hidden_1: int = HIDDEN_1, hidden_2: int = HIDDEN_2, projection_dim: int = HIDDEN_2) -> Any:
    """An SDXL-style UNet (plain top level, cross-attention below, text_time added embedding), tiny."""
    return tiny_unet(
        cross_attention_dim=hidden_1 + hidden_2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + projection_dim,
    )


def build_demo_sdxl_model(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL diffusers folder to ``out_dir`` without any download; return its path.

    ``StableDiffusionXLPipeline.from_pretrained(out_dir)`` reads it. The same ``seed`` gives
    identical weights. ``prediction_type`` is "epsilon" or "v_prediction".
    """
    from ..models.pipelines import pipeline_class

    out = new_demo_folder(out_dir, prediction_type)

    vocab, merges = train_demo_tokenizer()
    tokenizer = save_demo_tokenizer(out / "tokenizer", vocab, merges)
    tokenizer_2 = save_demo_tokenizer(out / "tokenizer_2", vocab, merges, pad_token=PAD_TOKEN_2)
    # Seeds per part (offset from the SD 1.x builder's) keep each part independent of the others.
    with _seeded(seed * 10 + 5):
        text_encoder = tiny_text_encoder(vocab, hidden_size=HIDDEN_1)
    with _seeded(seed * 10 + 6):
        text_encoder_2 = tiny_text_encoder(vocab, hidden_size=HIDDEN_2, with_projection=True)
    with _seeded(seed * 10 + 7):
        unet = tiny_sdxl_unet(projection_dim=text_encoder_2.config.projection_dim)
    vae = calibrated_vae(seed * 10 + 8)

    pipe = pipeline_class("StableDiffusionXLPipeline")(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=ddpm_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return save_demo_pipeline(pipe, out, kind="sdxl", seed=seed, prediction_type=prediction_type)
