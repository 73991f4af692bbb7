"""diffusers' own PEFT LoRA layout (what ``pipe.save_lora_weights`` writes).

Keys ``<part>.<module path>.lora_A.weight`` / ``.lora_B.weight``; ranks and alphas travel as a
PEFT ``LoraConfig`` per part in the ``lora_adapter_metadata`` JSON entry (``unet.r``,
``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``, ``unet.target_modules``).
Text encoder module names in that config leave out ``text_model.``: PEFT matches them as
suffixes, so they fit transformers 4 (``text_model.encoder...``) and 5 (``encoder...``) alike.

A diffusion transformer's (``transformer.``) config names its modules exactly instead: a regular
expression of the full names as ``target_modules`` and ``^``-anchored, escaped names in
``rank_pattern`` / ``alpha_pattern``. Suffix matching would be ambiguous there (FLUX's top-level
``proj_out`` is a suffix of every ``single_transformer_blocks.<i>.proj_out``).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from hcp_core.errors import UserError

from .naming import TEXT_MODEL_PREFIX, TRANSFORMER, UNET
from .weights import ExportLayer, LoraWeights

A = ".lora_A.weight"
B = ".lora_B.weight"
#: DoRA's magnitude: (out,) for a Linear, (1, out, 1, 1) for a convolution (PEFT's shapes).
MAGNITUDE = ".lora_magnitude_vector"
#: The text encoders' spelling: transformers 5 loads a text encoder's adapter by itself and finds
#: the magnitude only under this name (the plain one is reported UNEXPECTED and left at random).
TEXT_MAGNITUDE = MAGNITUDE + ".weight"


def _magnitude_key(target: str) -> str:
    return TEXT_MAGNITUDE if target.startswith("text_encoder") else MAGNITUDE
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def is_peft(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys are in this layout."""
    return any(k.endswith(A) for k in tensors)


def _config_name(target: str, path: str) -> str:
    if target != UNET and path.startswith(TEXT_MODEL_PREFIX):
        return path[len(TEXT_MODEL_PREFIX):]
    return path


def _lora_config(layers: List[ExportLayer]) -> Dict[str, Any]:
    """The LoraConfig kwargs for one part: the commonest rank/alpha plus per-module exceptions."""
    names = [_config_name(layer.target, layer.path) for layer in layers]
    ranks = [layer.weights.rank for layer in layers]
    alphas = [float(layer.weights.alpha) for layer in layers]
    r = Counter(ranks).most_common(1)[0][0]
    alpha = Counter(alphas).most_common(1)[0][0]
    exact = layers[0].target == TRANSFORMER
    keys = ["^" + re.escape(n) for n in names] if exact else names
    targets: Any = sorted(names)
    if exact:  # PEFT full-matches a string target_modules against each module name
        targets = "(?:" + "|".join(re.escape(n) for n in targets) + ")"
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: k for n, k in zip(keys, ranks) if k != r},
        "alpha_pattern": {n: a for n, a in zip(keys, alphas) if a != alpha},
        "target_modules": targets,
        "use_dora": any(layer.weights.magnitude is not None for layer in layers),
        "lora_bias": False,
    }


def to_peft(layers: Iterable[ExportLayer]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, safetensors metadata) of a PEFT-layout file for ``layers``."""
    tensors: Dict[str, torch.Tensor] = {}
    by_target: Dict[str, List[ExportLayer]] = {}
    for layer in layers:
        key = f"{layer.target}.{layer.path}"
        tensors[key + A] = layer.weights.down
        tensors[key + B] = layer.weights.up
        if layer.weights.magnitude is not None:
            shape = (-1,) if layer.weights.up.dim() == 2 else (1, -1, 1, 1)
            tensors[key + _magnitude_key(layer.target)] = layer.weights.magnitude.reshape(shape)
        by_target.setdefault(layer.target, []).append(layer)
    config: Dict[str, Any] = {}
    for target, group in by_target.items():
        for k, v in _lora_config(group).items():
            config[f"{target}.{k}"] = v
    return tensors, {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Optional[Any]:
    """PEFT's rule: a pattern key matches a module name it ends (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def from_peft(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, source: str
) -> Dict[str, LoraWeights]:
    """``<part>.<path>`` -> weights. Without a stored config alpha = rank (scale 1), as diffusers assumes."""
    config = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    out: Dict[str, LoraWeights] = {}
    used = set()
    for key, down in tensors.items():
        if not key.endswith(A):
            continue
        name = key[: -len(A)]
        if name + B not in tensors:
            raise UserError(f"{source}: '{key}' has no matching '{name + B}'")
        target, _, path = name.partition(".")
        rank = int(down.shape[0])
        module = _config_name(target, path)
        alpha = _pattern_value(config.get(f"{target}.alpha_pattern", {}), module)
        if alpha is None:
            alpha = config.get(f"{target}.lora_alpha", rank)
        alpha = float(alpha)
        if config.get(f"{target}.use_rslora"):
            alpha = alpha * rank / math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
        magnitude = tensors.get(name + MAGNITUDE, tensors.get(name + TEXT_MAGNITUDE))
        out[name] = LoraWeights(down=down, up=tensors[name + B], alpha=alpha,
                                magnitude=None if magnitude is None else magnitude.flatten())
        used.update({key, name + B, name + MAGNITUDE, name + TEXT_MAGNITUDE})
    other = sorted(k for k in tensors if k not in used)
    if other:
        raise UserError(f"{source}: keys that are not LoRA A/B weights: {', '.join(repr(k) for k in other[:5])}")
    return out
