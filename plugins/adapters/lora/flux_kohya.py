"""kohya's FLUX.1 LoRA layout: Black Forest Labs' module names, fused where BFL fuses.

kohya's sd-scripts (``networks/lora_flux.py``) and ComfyUI name FLUX LoRA layers after the
original (BFL) transformer, ``lora_unet_<BFL path, dots as underscores>`` with
``.lora_down.weight``, ``.lora_up.weight`` and a scalar ``.alpha`` (scale = alpha / rank); the
CLIP-L layers are ``lora_te1_<path>`` and T5's ``lora_te3_<path>``. hcp trains diffusers' modules,
where BFL has fewer, fused ones:

=============================================  =====================================================
BFL layer (``lora_unet_...``)                  diffusers layers, in the fused output order
=============================================  =====================================================
``double_blocks_{i}_img_attn_qkv``             ``transformer_blocks.{i}.attn.to_q``, ``to_k``, ``to_v``
``double_blocks_{i}_txt_attn_qkv``             ``...attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``
``double_blocks_{i}_img_attn_proj`` / ``txt``  ``...attn.to_out.0`` / ``...attn.to_add_out``
``double_blocks_{i}_img_mlp_0`` / ``_2``       ``...ff.net.0.proj`` / ``...ff.net.2`` (txt: ``ff_context``)
``double_blocks_{i}_img_mod_lin`` / ``txt``    ``...norm1.linear`` / ``...norm1_context.linear``
``single_blocks_{i}_linear1``                  ``single_transformer_blocks.{i}.attn.to_q``, ``to_k``,
                                               ``to_v``, ``proj_mlp``
``single_blocks_{i}_linear2``                  ``...proj_out``
``single_blocks_{i}_modulation_lin``           ``...norm.linear``
``img_in``, ``txt_in``, ``time_in_*``, ...     ``x_embedder``, ``context_embedder``, ``time_text_embed.*``
``final_layer_adaLN_modulation_1``             ``norm_out.linear`` (BFL's output halves are (shift,
                                               scale), diffusers' (scale, shift): rows swapped)
``final_layer_linear``                         ``proj_out``
=============================================  =====================================================

A fused layer's LoRA is written **exactly** (its delta is the members' deltas stacked): ``down`` is
the members' downs concatenated ``[sum r_k, in]``, ``up`` block-diagonal ``[sum d_k, sum r_k]``,
and alpha chosen so that alpha / rank is the first member's scale (other members' ups are scaled
by their own scale over it). A member that is not trained gets a zero block (the rank of the
others), so the fused layer keeps BFL's shape. Members' output sizes follow FLUX's architecture:
q, k and v have the attention width, the single blocks' MLP four times it.

diffusers' kohya converter (``FluxPipeline.load_lora_weights``) splits such a block-diagonal
layer back into exact per-member LoRAs. It ignores the alpha of the ``final_layer`` layers, so
their scale is folded into ``up`` and alpha written equal to the rank (the same delta either way).
It drops every layer outside the blocks (``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
``guidance_in``, ``final_layer``: it converts them without the ``transformer.`` prefix), which
kohya and ComfyUI apply; writing such layers logs a warning that names them.

Reading (:func:`split_flux_kohya`, for ``hcp generate --lora`` and ``merge-lora``): each fused
layer is split into its members exactly, by the model's own layer sizes. A member's LoRA is the
member's rows of ``up`` with the columns that are not zero in them (and those rows of ``down``),
alpha scaled with the rank, so its delta is exactly the member's rows of the fused delta; a
member whose rows are all zero gets no layer. That covers hcp's block-diagonal files and kohya's
own, whose fused layers share one ``down``.
"""
from __future__ import annotations

import functools
import logging
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .kohya_format import ALPHA, DOWN, UP
from .naming import canonical_path, kohya_name, lora_layers
from .weights import ExportLayer, LoraWeights

log = logging.getLogger(__name__)

#: kohya's key prefixes of FLUX's parts.
TRANSFORMER_PREFIX = "lora_unet"
PART_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}
#: Other prefixes readers meet for FLUX's CLIP-L (diffusers' converter accepts both).
READ_PREFIXES = {"text_encoder": ("lora_te1", "lora_te"), "text_encoder_2": ("lora_te3",)}
#: FLUX's single-block MLP is this many times the attention width (diffusers' FluxSingleTransformerBlock).
MLP_RATIO = 4

#: BFL layer in a double block -> the diffusers layers (relative to the block) it fuses, in order.
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
#: The same for a single block.
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
#: BFL layers outside the blocks -> the diffusers layer.
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}
#: BFL layers whose output halves are in the other order than diffusers'.
SWAPPED_HALVES = ("final_layer.adaLN_modulation.1",)
#: BFL layers whose alpha diffusers' converter ignores: written with the scale folded into ``up``.
SCALE_IN_UP = ("final_layer.adaLN_modulation.1", "final_layer.linear")

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_BY_DIFFUSERS = {path: bfl for bfl, path in GLOBAL.items()}


def bfl_layer(path: str) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """``(BFL layer path, the diffusers paths it fuses)`` for a diffusers transformer layer path, or
    None for a layer BFL's layout has no name for."""
    match = _BLOCK.match(path)
    if match is None:
        bfl = _BY_DIFFUSERS.get(path)
        return (bfl, (path,)) if bfl is not None else None
    kind, index, inner = match.groups()
    table, bfl_block = (DOUBLE_BLOCK, "double_blocks") if kind == "transformer_blocks" else (SINGLE_BLOCK, "single_blocks")
    for name, members in table.items():
        if inner in members:
            return f"{bfl_block}.{index}.{name}", tuple(f"{kind}.{index}.{m}" for m in members)
    return None


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """The two output halves of ``up`` exchanged: diffusers' (scale, shift) <-> BFL's (shift, scale)."""
    return torch.cat(up.chunk(2, dim=0)[::-1], dim=0)


def _member_sizes(members: Sequence[str], present: Dict[str, ExportLayer]) -> List[int]:
    """Each member's output size: the trained ones' from their ``up``, the others' from FLUX's
    architecture (q, k, v: the attention width; the single blocks' ``proj_mlp``: MLP_RATIO times it)."""
    sizes = {m: int(layer.weights.up.shape[0]) for m, layer in present.items()}
    attention = next((sizes[m] for m in members if m in sizes and not m.endswith("proj_mlp")), None)
    if attention is None:  # only proj_mlp is trained
        attention = sizes[members[-1]] // MLP_RATIO
    return [sizes.get(m, attention * MLP_RATIO if m.endswith("proj_mlp") else attention) for m in members]


def fuse(members: Sequence[str], present: Dict[str, ExportLayer]) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, alpha)`` of the fused layer whose delta is the members' deltas stacked on the
    output axis (zeros for members not in ``present``)."""
    layers = [present.get(m) for m in members]
    first = next(layer for layer in layers if layer is not None)
    ref_scale = first.weights.alpha / first.weights.rank
    rank_of_missing = max(layer.weights.rank for layer in layers if layer is not None)
    in_features = int(first.weights.down.shape[1])
    downs, ups = [], []
    for layer, size in zip(layers, _member_sizes(members, present)):
        if layer is None:
            downs.append(torch.zeros(rank_of_missing, in_features))
            ups.append(torch.zeros(size, rank_of_missing))
            continue
        w = layer.weights
        downs.append(w.down.float())
        ups.append(w.up.float() * ((w.alpha / w.rank) / ref_scale))
    down = torch.cat(downs, dim=0)
    up = torch.block_diag(*ups)
    return down, up, ref_scale * down.shape[0]


def _check_plain_lora(layer: ExportLayer) -> None:
    w = layer.weights
    if getattr(w, "magnitude", None) is not None or not hasattr(w, "down"):
        raise ValueError(f"{layer.target}.{layer.path}: kohya's FLUX layout holds plain LoRA layers only (this one "
                         "is DoRA or another algorithm); write it with format = \"peft\" (diffusers' layout)")
    if w.down.dim() != 2:
        raise ValueError(f"{layer.target}.{layer.path}: kohya's FLUX layout holds Linear layers only")


def to_flux_kohya(layers: Iterable[ExportLayer], kind: str = "flux") -> Dict[str, torch.Tensor]:
    """The tensors of a kohya-layout FLUX LoRA file for hcp's (diffusers-named) ``layers``.

    Transformer layers BFL fuses are written as one fused layer (see the module docstring); a
    transformer layer BFL has no name for, or a DoRA layer, is a ``ValueError`` naming it.
    """
    out: Dict[str, torch.Tensor] = {}
    fused: Dict[str, Tuple[Tuple[str, ...], Dict[str, ExportLayer]]] = {}
    for layer in layers:
        _check_plain_lora(layer)
        if layer.target != "transformer":
            prefix = PART_PREFIXES.get(layer.target)
            if prefix is None:
                raise ValueError(f"no kohya FLUX LoRA key prefix for model part {layer.target!r}")
            name = kohya_name(prefix, layer.path)
            out[name + DOWN], out[name + UP] = layer.weights.down, layer.weights.up
            out[name + ALPHA] = torch.tensor(float(layer.weights.alpha))
            continue
        found = bfl_layer(layer.path)
        if found is None:
            raise ValueError(f"transformer.{layer.path}: BFL's FLUX layout (kohya's) has no layer for it; train "
                             "other layers or write format = \"peft\" (diffusers' layout)")
        bfl, members = found
        fused.setdefault(bfl, (members, {}))[1][layer.path] = layer
    outside = tuple(sorted(bfl for bfl in fused if bfl in GLOBAL))
    if outside:
        _warn_diffusers_drops(outside)
    for bfl, (members, present) in fused.items():
        down, up, alpha = fuse(members, present)
        if bfl in SWAPPED_HALVES:
            up = swap_halves(up)
        if bfl in SCALE_IN_UP:
            up, alpha = up * (alpha / down.shape[0]), float(down.shape[0])
        name = f"{TRANSFORMER_PREFIX}_{bfl.replace('.', '_')}"
        out[name + DOWN], out[name + UP], out[name + ALPHA] = down, up, torch.tensor(float(alpha))
    return out


@functools.lru_cache(maxsize=None)
def _warn_diffusers_drops(names: Tuple[str, ...]) -> None:
    """Once per set of layers: diffusers' kohya FLUX converter loses the layers outside the blocks."""
    log.warning("kohya FLUX LoRA: %s are outside the transformer blocks; kohya's sd-scripts and ComfyUI apply them, "
                "but diffusers' FluxPipeline.load_lora_weights drops such layers of a kohya file (write "
                "[lora] format = \"peft\" for diffusers)", ", ".join(names))


# --------------------------------------------------------------------------- reading
def _kohya_names(parts: Mapping[str, nn.Module]) -> Dict[str, Tuple[str, Tuple[str, ...], str]]:
    """kohya name -> (model part, the native paths it covers: one, or a fused layer's members,
    the BFL layer path: "" for a text encoder layer)."""
    table: Dict[str, Tuple[str, Tuple[str, ...], str]] = {}
    for target, model in parts.items():
        for name, _ in lora_layers(model):
            if target == "transformer":
                found = bfl_layer(name)
                if found is not None:
                    table[f"{TRANSFORMER_PREFIX}_{found[0].replace('.', '_')}"] = (target, found[1], found[0])
                continue
            for prefix in READ_PREFIXES.get(target, ()):
                table.setdefault(kohya_name(prefix, canonical_path(target, model, name)), (target, (name,), ""))
                table.setdefault(kohya_name(prefix, name), (target, (name,), ""))
    return table


def _split(bfl: str, weights: LoraWeights, sizes: Sequence[int], source: str) -> List[Optional[LoraWeights]]:
    """The members' exact LoRAs of one fused layer (None for a member whose rows are all zero)."""
    up = weights.up.flatten(1)
    if up.shape[0] != sum(sizes):
        raise ValueError(f"{source}: kohya layer for '{bfl}' has {up.shape[0]} outputs but the model's layers "
                         f"have {sum(sizes)}: was the LoRA trained for another base model?")
    if bfl in SWAPPED_HALVES:
        up = swap_halves(up)
    out: List[Optional[LoraWeights]] = []
    for rows in torch.split(up, list(sizes), dim=0):
        cols = rows.abs().sum(dim=0) > 0
        rank = int(cols.sum())
        if rank == 0:
            out.append(None)
            continue
        scale = weights.alpha / weights.rank
        out.append(LoraWeights(down=weights.down[cols], up=rows[:, cols], alpha=scale * rank))
    return out


def split_flux_kohya(weights: Mapping[str, LoraWeights], parts: Mapping[str, nn.Module],
                     source: str) -> Dict[str, LoraWeights]:
    """A kohya-layout FLUX file's layers (kohya name -> weights) as ``<part>.<native path>`` ->
    weights, fused layers split exactly (see the module docstring). A name the model has no layer
    for is kept as it is, for the caller to report."""
    table = _kohya_names(parts)
    out: Dict[str, LoraWeights] = {}
    for name, layer in weights.items():
        if name not in table:
            out[name] = layer
            continue
        target, paths, bfl = table[name]
        if getattr(layer, "magnitude", None) is not None:
            raise ValueError(f"{source}: '{name}' is a DoRA layer; hcp reads kohya FLUX files with plain LoRA only")
        if target != "transformer":
            out[f"{target}.{canonical_path(target, parts[target], paths[0])}"] = layer
            continue
        sizes = [parts[target].get_submodule(p).out_features for p in paths]
        for path, member in zip(paths, _split(bfl, layer, sizes, source)):
            if member is not None:
                out[f"{target}.{path}"] = member
    return out
