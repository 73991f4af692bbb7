"""Module paths as LoRA files spell them, whatever the installed transformers calls them.

transformers 5 flattened ``CLIPTextModel`` (``encoder.layers.0...``) where transformers 4, webui,
kohya and diffusers' converters say ``text_model.encoder.layers.0...``. Files always get the
``text_model.`` spelling (the *canonical* path); reading accepts both.
"""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Tuple

from torch import nn

from hcp_core.models.layer_select import model_modules

TEXT_MODEL_PREFIX = "text_model."
UNET = "unet"


def kohya_prefix(target: str, kind: str = "sd") -> str:
    """``lora_unet`` / ``lora_te`` (``lora_te1`` and ``lora_te2`` for SDXL's two text encoders)."""
    if target == UNET:
        return "lora_unet"
    if target == "text_encoder":
        return "lora_te1" if kind == "sdxl" else "lora_te"
    if target == "text_encoder_2":
        return "lora_te2"
    raise ValueError(f"no LoRA key prefix for model part {target!r}")


def _is_flat_clip(model: nn.Module) -> bool:
    """A CLIP text model without the ``text_model`` level (transformers 5)."""
    return (
        type(model).__name__.startswith("CLIPTextModel")
        and not hasattr(model, "text_model")
        and hasattr(model, "encoder")
    )


def canonical_path(target: str, model: nn.Module, path: str) -> str:
    """The file spelling of module ``path`` of ``model`` (adds ``text_model.`` where it is flat)."""
    if target != UNET and _is_flat_clip(model):
        return TEXT_MODEL_PREFIX + path
    return path


def native_path(target: str, model: nn.Module, path: str) -> str:
    """The inverse of :func:`canonical_path`: the name ``model.named_modules()`` uses."""
    if target != UNET and _is_flat_clip(model) and path.startswith(TEXT_MODEL_PREFIX):
        return path[len(TEXT_MODEL_PREFIX):]
    return path


#: UNet layers whose kohya names use the original (sgm) spelling: diffusers' kohya converter, webui
#: and ComfyUI know SDXL's added-conditioning MLP only as ``label_emb.0.0`` / ``label_emb.0.2``.
KOHYA_UNET_RENAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def kohya_name(prefix: str, canonical: str) -> str:
    """``lora_unet`` + ``down_blocks.0.attentions.0`` -> ``lora_unet_down_blocks_0_attentions_0``
    (and ``add_embedding.linear_1`` -> ``lora_unet_label_emb_0_0``, see :data:`KOHYA_UNET_RENAMES`)."""
    if prefix == "lora_unet":
        canonical = KOHYA_UNET_RENAMES.get(canonical, canonical)
    return _underscored(prefix, canonical)


def _underscored(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Every module of ``model`` that can carry a LoRA (Linear and Conv2d), by native name."""
    for name, module in model_modules(model):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield name, module


def kohya_table(parts: Mapping[str, nn.Module], kind: str = "sd") -> Dict[str, Tuple[str, str]]:
    """kohya module name -> (model part, native path), for every possible LoRA layer.

    Underscores make kohya names ambiguous to split, so names are looked up, never parsed. Both
    text encoder spellings are listed (files from tools that wrote the flat one load too).
    """
    table: Dict[str, Tuple[str, str]] = {}
    for target, model in parts.items():
        prefix = kohya_prefix(target, kind)
        for name, _ in lora_layers(model):
            canonical = canonical_path(target, model, name)
            table[kohya_name(prefix, canonical)] = (target, name)
            if target == UNET and canonical in KOHYA_UNET_RENAMES:  # how hcp wrote them before (diffusers' names)
                table.setdefault(_underscored(prefix, canonical), (target, name))
            if canonical != name:
                table.setdefault(kohya_name(prefix, name), (target, name))
            elif target != UNET and name.startswith(TEXT_MODEL_PREFIX):
                table.setdefault(kohya_name(prefix, name[len(TEXT_MODEL_PREFIX):]), (target, name))
    return table


def dotted_table(parts: Mapping[str, nn.Module]) -> Dict[str, Tuple[str, str]]:
    """``<part>.<path>`` (either text encoder spelling) -> (model part, native path)."""
    table: Dict[str, Tuple[str, str]] = {}
    for target, model in parts.items():
        for name, _ in lora_layers(model):
            canonical = canonical_path(target, model, name)
            table[f"{target}.{canonical}"] = (target, name)
            table.setdefault(f"{target}.{name}", (target, name))
            if target != UNET and name.startswith(TEXT_MODEL_PREFIX):
                table.setdefault(f"{target}.{name[len(TEXT_MODEL_PREFIX):]}", (target, name))
    return table
