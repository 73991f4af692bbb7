"""Module paths as LoRA files spell them, whatever the installed transformers calls them.

The ``text_model.`` spelling rules (transformers 4 vs 5) are the core's
(:mod:`hcp_core.models.module_names`); this module adds the kohya and PEFT key tables.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

from torch import nn

from hcp_core.models.layer_select import model_modules
from hcp_core.models.module_names import TEXT_MODEL_PREFIX, UNET, canonical_path, native_path

__all__ = ["TEXT_MODEL_PREFIX", "UNET", "TRANSFORMER", "TRANSFORMER_KINDS", "canonical_path", "native_path",
           "kohya_prefix", "kohya_name", "kohya_table", "dotted_table", "lora_layers", "is_transformer_family",
           "default_format"]

TRANSFORMER = "transformer"
#: Families whose denoiser is a diffusion transformer; their LoRA files use diffusers' PEFT layout.
TRANSFORMER_KINDS = ("flux", "sd3")
#: kohya's ``ss_base_model_version`` for each family (sd-scripts' spelling where it has one).
BASE_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}


def is_transformer_family(models: object) -> bool:
    """True for a model (ModelBundle or pipeline) whose denoiser is a diffusion transformer."""
    kind = getattr(models, "kind", None)
    if kind in TRANSFORMER_KINDS:
        return True
    return getattr(models, "unet", None) is None and getattr(models, TRANSFORMER, None) is not None


def default_format(transformer_family: bool) -> str:
    """The file layout written when ``[lora] format`` is left out."""
    return "peft" if transformer_family else "kohya"


def kohya_prefix(target: str, kind: str = "sd") -> str:
    """``lora_unet`` / ``lora_te`` (``lora_te1`` and ``lora_te2`` for SDXL's two text encoders).

    A part kohya's SD/SDXL layout has no name for (a diffusion transformer, a T5 encoder) is a
    ``ValueError``.
    """
    if target == UNET:
        return "lora_unet"
    if target == "text_encoder":
        return "lora_te1" if kind == "sdxl" else "lora_te"
    if target == "text_encoder_2":
        return "lora_te2"
    raise ValueError(f"no kohya LoRA key prefix for model part {target!r}")


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


def kohya_table(parts: Mapping[str, nn.Module], kind: str = "sd",
                prefix_of: Optional[Callable[[str, str], str]] = None) -> Dict[str, Tuple[str, str]]:  # fmt: skip
    """kohya module name -> (model part, native path), for every possible LoRA layer.

    Underscores make kohya names ambiguous to split, so names are looked up, never parsed. Both
    text encoder spellings are listed (files from tools that wrote the flat one load too).
    ``prefix_of(target, kind)`` gives each part's prefix (default :func:`kohya_prefix`; LyCORIS
    files of diffusion transformers use their own).
    """
    table: Dict[str, Tuple[str, str]] = {}
    for target, model in parts.items():
        try:
            prefix = (prefix_of or kohya_prefix)(target, kind)
        except ValueError:  # a part kohya's layout has no names for (a transformer, T5): nothing matches it
            continue
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
