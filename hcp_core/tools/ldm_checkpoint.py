"""Write an SD 1.x model as one original-layout (ldm) checkpoint, the file webui and ComfyUI load.

Keys: ``model.diffusion_model.*`` (UNet, ldm block numbering), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder). This is the reverse of the
mapping diffusers' ``from_single_file`` reads; the tests check the round trip through it.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from ..errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]  # fmt: skip
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


class LdmLayoutError(UserError):
    """A model whose layout the single-file writer does not know."""


def _rename_first(rest: str, pairs: List[Tuple[str, str]]) -> str:
    for new, old in pairs:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _unet_rules(config: Mapping[str, Any]) -> List[Tuple[re.Pattern, Callable[[re.Match], str]]]:
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise LdmLayoutError("single-file export needs the same layers_per_block on every UNet level")
    step = per_level + 1
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]

    def down(m: re.Match) -> str:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + i * step + j
        if kind == "resnets":
            return f"input_blocks.{block}.0.{_rename_first(rest, _RESNET)}"
        return f"input_blocks.{block}.1.{rest}"

    def up(m: re.Match) -> str:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = i * step + j
        if kind == "resnets":
            return f"output_blocks.{block}.0.{_rename_first(rest, _RESNET)}"
        return f"output_blocks.{block}.1.{rest}"

    def upsample(m: re.Match) -> str:
        i = int(m[1])
        return f"output_blocks.{i * step + per_level}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"

    def mid(m: re.Match) -> str:
        kind, k, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if k == 0 else 2}.{_rename_first(rest, _RESNET)}"

    return [
        (re.compile(r"time_embedding\.linear_([12])\.(.*)"), lambda m: f"time_embed.{0 if m[1] == '1' else 2}.{m[2]}"),
        (re.compile(r"conv_in\.(.*)"), lambda m: f"input_blocks.0.0.{m[1]}"),
        (re.compile(r"conv_norm_out\.(.*)"), lambda m: f"out.0.{m[1]}"),
        (re.compile(r"conv_out\.(.*)"), lambda m: f"out.2.{m[1]}"),
        (re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)"), down),
        (re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)"),
         lambda m: f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"),
        (re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)"), mid),
        (re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)"), up),
        (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)"), upsample),
    ]  # fmt: skip


def _vae_rules(config: Mapping[str, Any]) -> List[Tuple[re.Pattern, Callable[[re.Match], str]]]:
    levels = len(config["up_block_types"])

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    return [
        (re.compile(r"(encoder|decoder)\.conv_norm_out\.(.*)"), lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (re.compile(r"(encoder|decoder)\.(conv_in|conv_out)\.(.*)"), lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
        (re.compile(r"(quant_conv|post_quant_conv)\.(.*)"), lambda m: f"{m[1]}.{m[2]}"),
        (re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)"),
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"),
        (re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)"),
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)"),
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"),
        (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)"),
         lambda m: f"{m[1]}.mid.attn_1.{_rename_first(m[2], _VAE_ATTN)}"),
        (re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)"),
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"),
        (re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)"),
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    ]  # fmt: skip


def _convert(state: Mapping[str, torch.Tensor], rules, part: str) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, build in rules:
            m = pattern.fullmatch(key)
            if m:
                out[build(m)] = value
                break
        else:
            raise LdmLayoutError(f"single-file export: the {part} has a weight '{key}' with no original-layout name")
    return out


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in ldm names (without the prefix)."""
    return _convert(state, _unet_rules(config), "UNet")


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in ldm names; attention projections become 1x1 convs."""
    out = _convert(state, _vae_rules(config), "VAE")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.dim() == 2:
            out[key] = value[:, :, None, None]
    return out


def sd1_checkpoint(
    unet_state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_state: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_state: Mapping[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """The whole ldm checkpoint; ``text_state`` has the standard ``text_model.`` keys."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_state, unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_state, vae_config).items()})
    out.update({TEXT_PREFIX + k: v for k, v in text_state.items()})
    return out
