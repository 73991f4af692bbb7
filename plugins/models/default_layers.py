"""The layers a LoRA group targets when it leaves ``layers`` out, per built-in family and part.

Each family's optional ``default_layers(part)`` returns these patterns (hcp's layer syntax: a
module name, or ``re:`` + a regex tried with ``re.match`` against ``named_modules()`` names; a
container means every Linear/Conv2d inside it). The choice is the attention and MLP layers of
the denoiser's transformer blocks and of the text encoders, what kohya's ``networks.lora`` and
diffusers' LoRA training scripts train by default; normalisation/modulation layers, embedders,
the UNet's ResNet blocks and the output projection are left out. A pattern that matches nothing
in a given model (SD3.5's ``attn2`` on SD3 medium) is skipped by the LoRA adapter.

Plain data, no torch: the names are those of diffusers 0.3x-0.4x and transformers 4 and 5.
"""
from __future__ import annotations

from typing import List, Mapping, Tuple

#: CLIP (``CLIPTextModel``, ``CLIPTextModelWithProjection``): every encoder layer's self-attention
#: (q/k/v/out_proj) and MLP (fc1/fc2), kohya's CLIPAttention + CLIPMLP. transformers 5 dropped
#: ``CLIPTextModel``'s ``text_model.`` level but keeps it in ``CLIPTextModelWithProjection``.
CLIP_LAYERS = (r"re:(text_model\.)?encoder\.layers\.\d+\.(self_attn|mlp)$",)

#: T5 encoder: the self-attention projections q/k/v/o of every block (not its feed-forward).
T5_LAYERS = (r"re:encoder\.block\.\d+\.layer\.0\.SelfAttention\.(q|k|v|o)$",)

#: SD/SDXL UNet: every Transformer2DModel block (``attentions.N``): proj_in, attn1/attn2's
#: to_q/to_k/to_v/to_out.0, the feed-forward and proj_out; kohya's default for ``networks.lora``
#: (so kohya-layout files hold the layers webui users expect). ResNet convolutions are left out.
UNET_LAYERS = (r"re:(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+$",)

_ATTENTION = r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"

#: FLUX.1 transformer: the joint blocks' attention (image to_q/k/v/out.0, text add_q/k/v_proj and
#: to_add_out) and feed-forwards (ff, ff_context), the single blocks' attention (to_q/k/v) and
#: their MLP and output projections (proj_mlp, proj_out). diffusers' FLUX DreamBooth LoRA default
#: (attn.* and ff.* / ff_context.*) plus the single blocks' proj_mlp/proj_out, as kohya's
#: lora_flux (every block Linear but the modulation).
FLUX_TRANSFORMER_LAYERS = (
    rf"re:(single_)?transformer_blocks\.\d+\.attn\.{_ATTENTION}$",
    r"re:transformer_blocks\.\d+\.(ff|ff_context)$",
    r"re:single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$",
)

#: SD3 / 3.5 transformer (MMDiT): each joint block's attention (image and text projections, and
#: SD3.5's second image attention ``attn2``) and feed-forwards (ff, ff_context).
SD3_TRANSFORMER_LAYERS = (
    rf"re:transformer_blocks\.\d+\.(attn|attn2)\.{_ATTENTION}$",
    r"re:transformer_blocks\.\d+\.(ff|ff_context)$",
)

#: Per family, part -> patterns.
Patterns = Mapping[str, Tuple[str, ...]]
STABLE_DIFFUSION: Patterns = {"unet": UNET_LAYERS, "text_encoder": CLIP_LAYERS, "text_encoder_2": CLIP_LAYERS}
FLUX: Patterns = {"transformer": FLUX_TRANSFORMER_LAYERS, "text_encoder": CLIP_LAYERS, "text_encoder_2": T5_LAYERS}
SD3: Patterns = {"transformer": SD3_TRANSFORMER_LAYERS, "text_encoder": CLIP_LAYERS, "text_encoder_2": CLIP_LAYERS,
                 "text_encoder_3": T5_LAYERS}


def patterns_for(table: Patterns, part: str) -> List[str]:
    """``table[part]`` as a fresh list; an empty list for a part without defaults."""
    return list(table.get(part, ()))


__all__ = ["CLIP_LAYERS", "T5_LAYERS", "UNET_LAYERS", "FLUX_TRANSFORMER_LAYERS", "SD3_TRANSFORMER_LAYERS",
           "STABLE_DIFFUSION", "FLUX", "SD3", "patterns_for"]
