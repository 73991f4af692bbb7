"""A tiny Stable Diffusion 3.5 model, written offline, for demos and tests.

It has SD3.5's layout and conditioning (the medium variant's: QK RMS-norm, and a second,
image-only attention in the first block) with about a megabyte of random weights:

* ``transformer``: an ``SD3Transformer2DModel`` (MMDiT) over 2x2 patches of 16 latent channels;
* ``text_encoder`` / ``text_encoder_2``: two CLIP text models with projections (CLIP-L and
  CLIP-G's roles) and their tokenizers (the second pads with "!", as SD3's does). Their
  penultimate hidden states are concatenated and zero-padded to the T5 width; their projected
  pooled outputs are concatenated into the transformer's pooled projection;
* ``text_encoder_3`` / ``tokenizer_3``: a T5 encoder, whose hidden states are appended to the
  CLIP ones as further text tokens, and a T5 tokenizer (see :mod:`.flow`);
* a 16-channel VAE with calibrated shift and scaling factors and no quant convs;
* the flow-matching Euler scheduler with SD3's shift 3.

The two CLIP encoders have *different* widths on purpose, so a mix-up of their order fails loudly.
``StableDiffusion3Pipeline.from_pretrained(path)`` loads it like a real checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .flow import (
    SD3_SCHEDULER,
    calibrated_flow_vae,
    diffusers_pipeline_class,
    flow_match_scheduler,
    new_flow_folder,
    save_demo_t5_tokenizer,
    tiny_t5_encoder,
)
from .model import _seeded, save_demo_pipeline, save_demo_tokenizer, tiny_text_encoder, train_demo_tokenizer
from .sdxl import HIDDEN_1, HIDDEN_2, PAD_TOKEN_2

#: Widths of the two CLIP encoders (SD3: 768 and 1280), their projections the same.
CLIP_HIDDEN_1 = HIDDEN_1
CLIP_HIDDEN_2 = HIDDEN_2
#: Width of the T5 encoder and so the transformer's joint attention dim (SD3: 4096); wider than
#: the two CLIP widths together, so the CLIP hidden states are padded as on the real model.
T5_D_MODEL = 96
#: Transformer attention: 2 heads of 16 (SD3.5 medium: 24 of 64), over 2 blocks.
HEADS = 2
HEAD_DIM = 16
LAYERS = 2


def tiny_sd3_transformer(
    *, pooled_projection_dim: int = CLIP_HIDDEN_1 + CLIP_HIDDEN_2, joint_attention_dim: int = T5_D_MODEL
) -> Any:
    """An SD3.5-medium-style SD3Transformer2DModel (QK norm, dual attention in block 0), tiny.

    ``pooled_projection_dim`` is the two CLIP projections together, ``joint_attention_dim`` the
    T5 width (which the CLIP hidden states are padded to).
    """
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32,  # default generation size 32 x 8 = 256 px
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=LAYERS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=32,  # up to 512 px (SD3: 96 -> 1536 px)
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def build_demo_sd3_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny SD3.5 diffusers folder to ``out_dir`` without any download; return its path.

    ``StableDiffusion3Pipeline.from_pretrained(out_dir)`` reads it. The same ``seed`` gives
    identical weights.
    """
    out = new_flow_folder(out_dir)

    vocab, merges = train_demo_tokenizer()
    tokenizer = save_demo_tokenizer(out / "tokenizer", vocab, merges)
    tokenizer_2 = save_demo_tokenizer(out / "tokenizer_2", vocab, merges, pad_token=PAD_TOKEN_2)
    tokenizer_3 = save_demo_t5_tokenizer(out / "tokenizer_3")
    # Seeds per part (offset from the SD 1.x / SDXL / FLUX builders') keep each part independent.
    with _seeded(seed * 10 + 2001):
        text_encoder = tiny_text_encoder(vocab, hidden_size=CLIP_HIDDEN_1, with_projection=True)
    with _seeded(seed * 10 + 2002):
        text_encoder_2 = tiny_text_encoder(vocab, hidden_size=CLIP_HIDDEN_2, with_projection=True)
    with _seeded(seed * 10 + 2003):
        text_encoder_3 = tiny_t5_encoder(len(tokenizer_3), d_model=T5_D_MODEL)
    # The pipeline zero-pads the concatenated CLIP hidden states to the T5 width; it cannot shrink them.
    assert text_encoder.config.hidden_size + text_encoder_2.config.hidden_size <= text_encoder_3.config.d_model
    with _seeded(seed * 10 + 2004):
        transformer = tiny_sd3_transformer(
            pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
            joint_attention_dim=text_encoder_3.config.d_model,
        )
    vae = calibrated_flow_vae(seed * 10 + 2005)

    pipe = diffusers_pipeline_class("StableDiffusion3Pipeline")(
        transformer=transformer,
        scheduler=flow_match_scheduler(**SD3_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return save_demo_pipeline(pipe, out, kind="sd3", seed=seed, prediction_type="flow_match")
