"""LyCORIS files: the kohya-style key layout webui and ComfyUI read, written and read back.

Per layer ``<name>.hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` (LoHa) or
``<name>.lokr_w1`` (or ``lokr_w1_a`` / ``lokr_w1_b``) with ``lokr_w2`` (or ``lokr_w2_a`` /
``lokr_w2_b``) (LoKr), and a scalar ``<name>.alpha``; ``<name>`` is the kohya module name
(:mod:`.naming`). A file may also hold plain LoRA / DoRA layers (``lora_down`` ...), as LyCORIS
writes for some presets; they are read with the LoRA plugin's rules.

Registered as the ``files=`` capability of the ``lycoris`` adapter: ``hcp generate --lora`` and
``hcp tools merge-lora`` merge such files through :class:`LycorisFiles`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Tuple

import torch
from torch import nn

from hcp_core.errors import did_you_mean
from hcp_core.interfaces import FileHeader

from ..lora import kohya_format
from ..lora.lora_file import LoraFileError, read_adapter_tensors, validate_lora_layer
from ..lora.naming import kohya_name, kohya_table
from ..lora.weights import ExportLayer, LoraWeights
from .algorithms import LOHA_KEYS, LOKR_KEYS, LycorisWeights
from .naming import lycoris_prefix

#: A key ending in one of these makes a file LyCORIS's (LoHa / LoKr layers).
MARKERS = kohya_format.LYCORIS_ONLY
ALPHA = ".alpha"


def is_lycoris(keys: Iterable[str]) -> bool:
    """True when some key is a LoHa or LoKr tensor."""
    return any(k.endswith(MARKERS) for k in keys)


@dataclass
class LycorisFile:
    """A file's layers by kohya module name (:class:`LycorisWeights`, or ``LoraWeights`` for plain ones)."""

    path: str
    weights: Dict[str, Any]
    metadata: Dict[str, str] = field(default_factory=dict)
    layout: str = "kohya"


def to_lycoris(layers: Iterable[ExportLayer], kind: str = "sd") -> Dict[str, torch.Tensor]:
    """The tensors of a LyCORIS file for ``layers`` (of :class:`LycorisWeights`)."""
    out: Dict[str, torch.Tensor] = {}
    for layer in layers:
        name = kohya_name(lycoris_prefix(layer.target, kind), layer.path)
        for key, tensor in layer.weights.tensors.items():
            out[f"{name}.{key}"] = tensor
        out[name + ALPHA] = torch.tensor(float(layer.weights.alpha if layer.weights.alpha is not None else layer.weights.rank))
    return out


def read_lycoris_file(path: str | os.PathLike) -> LycorisFile:
    """Load a LyCORIS (or kohya LoRA/DoRA) file as float32 layers, validated; a broken one is a
    :class:`~plugins.adapters.lora.lora_file.LoraFileError` naming the file and key."""
    path = str(path)
    metadata, tensors = read_adapter_tensors(path, "LyCORIS")
    by_layer: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        by_layer.setdefault(name, {})[suffix] = tensor
    weights: Dict[str, Any] = {}
    plain: Dict[str, torch.Tensor] = {}
    for name, parts in by_layer.items():
        if any(s in parts for s in ("lora_down.weight", "lora_up.weight")):
            plain.update({f"{name}.{s}": t for s, t in parts.items()})
            continue
        weights[name] = _parse_layer(path, name, parts)
    if plain:
        for name, lora in kohya_format.from_kohya(plain, source=path).items():
            validate_lora_layer(path, name, lora, down_key=name + kohya_format.DOWN, up_key=name + kohya_format.UP)
            weights[name] = lora
    if not weights:
        raise LoraFileError(f"{path}: no LoHa, LoKr or LoRA layers found")
    return LycorisFile(path, weights, metadata)


def _parse_layer(source: str, name: str, parts: Mapping[str, torch.Tensor]) -> LycorisWeights:
    keys = set(parts) - {"alpha"}
    algo = "loha" if keys & set(LOHA_KEYS) else "lokr" if keys & set(LOKR_KEYS) else None
    known = set(LOHA_KEYS if algo == "loha" else LOKR_KEYS)
    other = sorted(keys - known)
    if algo is None or other:
        shown = ", ".join(f"'{name}.{k}'" for k in (other or sorted(keys))[:4])
        raise LoraFileError(f"{source}: {shown}: not LoHa, LoKr or LoRA weights; hcp reads those (not LyCORIS's "
                            "Tucker 'hada_t1'/'lokr_t2', GLoRA, OFT, BOFT, DyLoRA or IA3 layers)")
    needed = [LOHA_KEYS] if algo == "loha" else [("lokr_w1",) if "lokr_w1" in keys else ("lokr_w1_a", "lokr_w1_b"),
                                                  ("lokr_w2",) if "lokr_w2" in keys else ("lokr_w2_a", "lokr_w2_b")]
    missing = [k for group in needed for k in group if k not in keys]
    if missing:
        raise LoraFileError(f"{source}: layer '{name}' ({algo}) lacks '{name}.{missing[0]}'; the file is damaged")
    alpha = parts.get("alpha")
    weights = LycorisWeights(algo, {k: parts[k] for k in keys}, None if alpha is None else float(alpha))
    _check_factors(source, name, weights)
    return weights


def _check_factors(source: str, name: str, w: LycorisWeights) -> None:
    """The factors of one layer fit each other (so the formula gives a weight update)."""
    t = w.tensors
    pairs = ([("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")] if w.algo == "loha"
             else [(a, b) for a, b in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")) if a in t])  # fmt: skip
    for a, b in pairs:
        if t[a].dim() != 2 or t[b].dim() < 2 or t[a].shape[1] != t[b].shape[0]:
            raise LoraFileError(f"{source}: '{name}.{a}' {tuple(t[a].shape)} and '{name}.{b}' {tuple(t[b].shape)} "
                                "do not multiply; the file is damaged")
    if w.algo == "loha" and (t["hada_w1_a"].shape[0] != t["hada_w2_a"].shape[0] or
                             t["hada_w1_b"][0].numel() != t["hada_w2_b"][0].numel()):
        raise LoraFileError(f"{source}: layer '{name}': the two LoHa products have different shapes; the file is damaged")


def match_lycoris_layers(lyc: LycorisFile, parts: Mapping[str, nn.Module], kind: str = "sd") -> Dict[Tuple[str, str], Any]:
    """The file's layers as (model part, native path) of ``parts``, shapes checked; an unknown
    layer or a shape that differs is an error naming it."""
    table = kohya_table(parts, kind, prefix_of=lycoris_prefix)
    out: Dict[Tuple[str, str], Any] = {}
    for name, weights in lyc.weights.items():
        if name not in table:
            raise LoraFileError(f"{lyc.path}: layer '{name}' is not in this model ({', '.join(parts)})."
                                f"{did_you_mean(name, table)} Was it trained for another base model?")
        target, path = table[name]
        host = parts[target].get_submodule(path)
        shape = tuple(host.weight.shape)
        if isinstance(weights, LoraWeights):
            got: Tuple[int, ...] = tuple(weights.up.shape[:1]) + tuple(weights.down.shape[1:])
            fits = got == shape
        else:
            got = weights.delta_shape()
            fits = got == (shape[0], host.weight[0].numel())
        if not fits:
            raise LoraFileError(f"{lyc.path}: layer '{name}' has shape {got} but the model's layer is {shape}")
        out[(target, path)] = weights
    return out


class LycorisFiles:
    """Reads LyCORIS LoHa / LoKr ``.safetensors`` files (keys ``*.hada_w1_a``, ``*.lokr_w1`` ...)."""

    def reads(self, header: FileHeader) -> bool:
        """True for a .safetensors file with LoHa or LoKr keys."""
        return header.safetensors and is_lycoris(header.keys)

    def apply(self, models: Any, path: str, weight: float) -> int:
        """``W += weight * dW`` for every layer of the file (float32 maths); the number of layers."""
        from ..lora.merge import bundle_kind, bundle_parts, merge_layers

        parts = bundle_parts(models)
        layers = match_lycoris_layers(read_lycoris_file(path), parts, bundle_kind(models, parts))
        merge_layers(parts, layers, weight)
        return len(layers)
