"""A tiny FLUX.1 model, written offline, for demos and tests.

It has FLUX.1's layout and conditioning with about a megabyte of random weights:

* ``transformer``: a ``FluxTransformer2DModel`` with one double-stream (joint) block and one
  single-stream block; its input is the VAE's 16 latent channels packed 2x2 into 64, positions
  go through 3-axis RoPE (``axes_dims_rope`` sum to the head width), and a dev-style model
  (``guidance=True``) embeds the distilled guidance scale, a schnell-style one does not;
* ``text_encoder`` / ``tokenizer``: a CLIP text model (only its pooled output is used) and the
  demo's CLIP BPE tokenizer;
* ``text_encoder_2`` / ``tokenizer_2``: a T5 encoder, whose hidden states are the transformer's
  text tokens, and a T5 tokenizer (see :mod:`.flow`);
* a 16-channel VAE with calibrated shift and scaling factors and no quant convs;
* the flow-matching Euler scheduler with FLUX.1-dev's resolution-dependent shift (schnell: none).

``FluxPipeline.from_pretrained(path)`` loads it like a real checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .flow import (
    FLUX_SCHEDULER,
    FLUX_SCHNELL_SCHEDULER,
    calibrated_flow_vae,
    diffusers_pipeline_class,
    flow_match_scheduler,
    new_flow_folder,
    save_demo_t5_tokenizer,
    tiny_t5_encoder,
)
from .model import _seeded, save_demo_pipeline, save_demo_tokenizer, tiny_text_encoder, train_demo_tokenizer

#: Width of the CLIP text encoder, whose pooled output is the transformer's pooled projection (FLUX: 768).
CLIP_HIDDEN = 32
#: Width of the T5 encoder, the transformer's joint attention dim (FLUX: 4096).
T5_D_MODEL = 32
#: Transformer attention: 2 heads of 16 (FLUX: 24 of 128), RoPE axes (FLUX: 16, 56, 56).
HEADS = 2
HEAD_DIM = 16
AXES_DIMS_ROPE = (4, 6, 6)
#: Latent channels of the VAE; the transformer sees them packed 2x2.
LATENT_CHANNELS = 16


def tiny_flux_transformer(
    *, guidance: bool = True, clip_hidden: int = CLIP_HIDDEN, t5_d_model: int = T5_D_MODEL, num_layers: int = 1,
    num_single_layers: int = 1, heads: int = HEADS, head_dim: int = HEAD_DIM,
    axes_dims_rope: Sequence[int] = AXES_DIMS_ROPE,
) -> Any:
    """A FluxTransformer2DModel, by default with one joint and one single-stream block, tiny.

    The keyword arguments size it (benchmarks build wider and deeper ones); ``axes_dims_rope``
    must sum to ``head_dim``.
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_d_model,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=guidance,
        axes_dims_rope=tuple(axes_dims_rope),
    )


def build_demo_flux_model(
    out_dir: str | Path, *, seed: int = 0, guidance: bool = True, clip_hidden: int = CLIP_HIDDEN,
    t5_d_model: int = T5_D_MODEL, text_layers: Optional[int] = None,
    transformer_sizes: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a tiny FLUX.1 diffusers folder to ``out_dir`` without any download; return its path.

    ``FluxPipeline.from_pretrained(out_dir)`` reads it. ``guidance=True`` builds a dev-style model
    (guidance-distilled: the transformer embeds ``guidance_scale``, dynamic scheduler shift);
    ``guidance=False`` a schnell-style one. The same ``seed`` gives identical weights.

    Sizes (defaults: the tiny demo): ``clip_hidden`` and ``t5_d_model`` are the text encoders'
    widths (the transformer's pooled projection and joint attention dims follow them),
    ``text_layers`` their depth (None: each builder's default), ``transformer_sizes`` further
    :func:`tiny_flux_transformer` keywords (``num_layers``, ``num_single_layers``, ``heads``,
    ``head_dim``, ``axes_dims_rope``).
    """
    depth = {} if text_layers is None else {"layers": text_layers}
    out = new_flow_folder(out_dir)

    vocab, merges = train_demo_tokenizer()
    tokenizer = save_demo_tokenizer(out / "tokenizer", vocab, merges)
    tokenizer_2 = save_demo_t5_tokenizer(out / "tokenizer_2")
    # Seeds per part (offset from the SD 1.x / SDXL / SD3 builders') keep each part independent.
    with _seeded(seed * 10 + 1001):
        text_encoder = tiny_text_encoder(vocab, hidden_size=clip_hidden, **depth)
    with _seeded(seed * 10 + 1002):
        text_encoder_2 = tiny_t5_encoder(len(tokenizer_2), d_model=t5_d_model, **depth)
    with _seeded(seed * 10 + 1003):
        transformer = tiny_flux_transformer(guidance=guidance, clip_hidden=clip_hidden, t5_d_model=t5_d_model,
                                            **dict(transformer_sizes or {}))
    vae = calibrated_flow_vae(seed * 10 + 1004)

    pipe = diffusers_pipeline_class("FluxPipeline")(
        scheduler=flow_match_scheduler(**(FLUX_SCHEDULER if guidance else FLUX_SCHNELL_SCHEDULER)),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return save_demo_pipeline(pipe, out, kind="flux", seed=seed, prediction_type="flow_match", guidance=guidance)
