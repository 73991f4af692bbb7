"""Write an SD 1.x or SDXL model as one original-layout (ldm / SGM) checkpoint, the file webui and ComfyUI load.

Keys: ``model.diffusion_model.*`` (UNet, ldm block numbering; SDXL's added embedding is
``label_emb.0``), ``first_stage_model.*`` (VAE), and the text encoders: SD 1.x's CLIP under
``cond_stage_model.transformer.text_model.*``; SDXL's first (CLIP) under
``conditioner.embedders.0.transformer.text_model.*`` and its second in OpenCLIP's layout under
``conditioner.embedders.1.model.*``. This is the reverse of the mapping diffusers'
``from_single_file`` reads; the tests check the round trip through it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from hcp_core.errors import UserError
from hcp_core.models.module_names import canonical_state_dict
from hcp_core.tools.safetensors_writer import write_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."
#: OpenCLIP's contrastive temperature as trained models end with it (clamped at ln 100). The text
#: tower never uses it; SDXL files carry it, and loaders that build OpenCLIP's whole model expect it.
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]  # fmt: skip
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
# Inside one OpenCLIP residual block (after q, k and v are fused into ``self_attn.in_proj_*``).
_OPEN_CLIP_BLOCK = [("self_attn", "attn"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]  # fmt: skip


class LdmLayoutError(UserError):
    """A model whose layout the single-file writer does not know."""


def _rename_first(rest: str, pairs: List[Tuple[str, str]]) -> str:
    for new, old in pairs:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _two_linears(diffusers_name: str, ldm_name: str) -> Tuple[re.Pattern, Callable[[re.Match], str]]:
    """``<name>.linear_1/2.*`` -> ``<ldm>.0/2.*``: an MLP whose SiLU sits between at index 1."""
    pattern = re.compile(re.escape(diffusers_name) + r"\.linear_([12])\.(.*)")
    return pattern, lambda m: f"{ldm_name}.{0 if m[1] == '1' else 2}.{m[2]}"


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
        _two_linears("time_embedding", "time_embed"),
        _two_linears("add_embedding", "label_emb.0"),  # SDXL's pooled-text + size/crop embedding
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


_OPEN_CLIP_RULES = [
    (re.compile(r"text_model\.embeddings\.token_embedding\.(.*)"), lambda m: f"token_embedding.{m[1]}"),
    (re.compile(r"text_model\.embeddings\.position_embedding\.weight"), lambda m: "positional_embedding"),
    (re.compile(r"text_model\.final_layer_norm\.(.*)"), lambda m: f"ln_final.{m[1]}"),
    (re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.*)"),
     lambda m: f"transformer.resblocks.{m[1]}.{_rename_first(m[2], _OPEN_CLIP_BLOCK)}"),
    (re.compile(r"text_projection\.weight"), lambda m: "text_projection"),
]  # fmt: skip
_QKV = re.compile(r"(text_model\.encoder\.layers\.\d+\.self_attn)\.([qkv])_proj\.(weight|bias)")


#: A tensor, or (``deferred``) a zero-argument callable making it when a writer needs it.
Deferrable = Union[torch.Tensor, Callable[[], torch.Tensor]]


def _fuse_qkv(state: Mapping[str, torch.Tensor], deferred: bool = False) -> Dict[str, Deferrable]:
    """OpenCLIP's attention keeps q, k and v as one ``in_proj`` matrix (rows q, then k, then v).

    ``deferred``: each fused matrix is a callable that makes it (a streaming writer then holds one
    at a time instead of a copy of every attention layer)."""
    out: Dict[str, Deferrable] = {}
    parts: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _QKV.fullmatch(key)
        if m:
            parts.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[key] = value
    for (attn, kind), qkv in parts.items():
        if sorted(qkv) != ["k", "q", "v"]:
            raise LdmLayoutError(f"single-file export: {attn} lacks a {kind} for one of q, k, v (has {sorted(qkv)})")
        parts_in_order = [qkv["q"], qkv["k"], qkv["v"]]
        fuse = lambda parts=parts_in_order: torch.cat(parts)  # noqa: E731
        out[f"{attn}.in_proj_{kind}"] = fuse if deferred else fuse()
    return out


def text_encoder_2_to_open_clip(state: Mapping[str, torch.Tensor], deferred: bool = False) -> Dict[str, Deferrable]:
    """A CLIPTextModelWithProjection state dict (``text_model.*``, ``text_projection.weight``) in OpenCLIP names.

    OpenCLIP multiplies by ``text_projection`` on the right (``x @ P``), so it stores the
    transpose of the Linear layer's weight. ``logit_scale`` is added (see OPEN_CLIP_LOGIT_SCALE).
    ``deferred``: fused q/k/v matrices are callables (see :func:`_fuse_qkv`), the projection a view.
    """
    if "text_projection.weight" not in state:
        raise LdmLayoutError(
            "single-file export: SDXL's second text encoder needs its text_projection (CLIPTextModelWithProjection)"
        )
    out = _convert(_fuse_qkv(state, deferred), _OPEN_CLIP_RULES, "second text encoder")
    projection = out["text_projection"].t()
    out["text_projection"] = projection if deferred else projection.contiguous()
    out["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=projection.dtype)
    return out


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def ldm_state_dict(
    unet_state: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_state: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    text_state: Mapping[str, torch.Tensor],
    text_2_state: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    deferred: bool = False,
) -> Dict[str, Deferrable]:
    """The whole original-layout checkpoint: SD 1.x's (ldm), or SDXL's (SGM) when ``text_2_state`` is given.

    ``text_state`` is the (first) text encoder's weights with the standard ``text_model.`` keys;
    ``text_2_state`` is SDXL's second encoder's (CLIPTextModelWithProjection) state dict. Values
    are the given tensors (or views of them) except SDXL's fused q/k/v: with ``deferred`` those are
    callables for :func:`hcp_core.tools.safetensors_writer.write_safetensors`, which makes and
    writes them one at a time (no copy of the model's weights exists at once).
    """
    out = _prefixed(UNET_PREFIX, unet_to_ldm(unet_state, unet_config))
    out.update(_prefixed(VAE_PREFIX, vae_to_ldm(vae_state, vae_config)))
    if text_2_state is None:
        out.update(_prefixed(TEXT_PREFIX, text_state))
    else:
        out.update(_prefixed(SDXL_TEXT_PREFIX, text_state))
        out.update(_prefixed(SDXL_TEXT_2_PREFIX, text_encoder_2_to_open_clip(text_2_state, deferred)))
    return out


def single_file_problem(models: Any) -> Optional[str]:
    """Why ``models`` (a :class:`~hcp_core.interfaces.ModelBundle`) cannot be written as one
    original-layout file, or None when it can (SD 1.x with OpenAI CLIP, SDXL)."""
    if models.kind not in ("sd", "sdxl"):
        return (f"hcp writes no single-file layout for {models.kind} models (only SD 1.x and SDXL); "
                "the diffusers folder is complete and loads in diffusers and ComfyUI")
    # SD 2.x keeps an OpenCLIP text encoder (1024 wide, plain gelu) under another key layout.
    te_config = models.text_encoder.config
    if models.kind == "sd" and (te_config.hidden_size == 1024 or te_config.hidden_act == "gelu"):
        return ("SD 2.x models (OpenCLIP text encoder) have no single-file writer in hcp yet (only SD 1.x and "
                "SDXL); use the diffusers folder for this model")
    return None


def module_state(part: str, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A part's tensors as the single file takes them: the module's own, a CLIP text encoder's
    under the standard (transformers 4, webui) names ``text_model.*``."""
    return canonical_state_dict("text_encoder", module) if part.startswith("text_encoder") else module.state_dict()


def write_single_file(
    models: Any,
    path: Path,
    dtype: torch.dtype,
    *,
    part_state: Callable[[str, torch.nn.Module], Mapping[str, torch.Tensor]] = module_state,
    metadata: Optional[Dict[str, str]] = None,
) -> Path:
    """Write ``models`` (SD 1.x or SDXL: check :func:`single_file_problem` first) as one
    original-layout ``.safetensors`` at ``path`` in ``dtype``, tensor by tensor (no copy of the
    model in ``dtype`` exists at once). ``part_state(part, module)`` gives each part's tensors
    (default :func:`module_state`; the fine-tune exporter passes its base weights')."""
    sdxl = models.kind == "sdxl"
    state = ldm_state_dict(
        part_state("unet", models.unet), dict(models.unet.config),
        part_state("vae", models.vae), dict(models.vae.config),
        part_state("text_encoder", models.text_encoder),
        part_state("text_encoder_2", models.text_encoder_2) if sdxl else None,
        deferred=True,
    )  # fmt: skip
    return write_safetensors(path, state, dtype=dtype, metadata={"format": "pt", **(metadata or {})})
