"""Read and write LoRA .safetensors files in either layout, and match them to a model's layers."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from hcp_core.errors import UserError, did_you_mean

from . import kohya_format, peft_format
from .naming import dotted_table, kohya_table
from .weights import ExportLayer, LoraWeights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: (model part, native module path) -> that layer's LoRA.
LayerWeights = Dict[Tuple[str, str], LoraWeights]


class LoraFileError(UserError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass
class LoraFile:
    """A LoRA file's layers by the file's own module names, its layout and metadata."""

    path: str
    layout: str  # "kohya" | "peft"
    weights: Dict[str, LoraWeights]
    metadata: Dict[str, str] = field(default_factory=dict)


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Load a kohya- or PEFT-layout LoRA file (float32 tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise LoraFileError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(f"{path}: not a readable .safetensors file ({exc})") from None
    if kohya_format.is_kohya(tensors):
        return LoraFile(path, "kohya", kohya_format.from_kohya(tensors, source=path), metadata)
    if peft_format.is_peft(tensors):
        return LoraFile(path, "peft", peft_format.from_peft(tensors, metadata, source=path), metadata)
    raise LoraFileError(
        f"{path}: no LoRA weights found (expected '*.lora_down.weight' kohya keys or '*.lora_A.weight' PEFT keys)"
    )


def match_layers(lora: LoraFile, parts: Mapping[str, nn.Module], kind: str = "sd") -> LayerWeights:
    """The file's layers as (model part, native path) of ``parts``, shapes checked.

    A module the model does not have, or whose shape differs, is an error naming it: applying
    half a LoRA silently is worse than not applying it.
    """
    table = kohya_table(parts, kind) if lora.layout == "kohya" else dotted_table(parts)
    out: LayerWeights = {}
    for name, weights in lora.weights.items():
        if name not in table:
            raise LoraFileError(
                f"{lora.path}: layer '{name}' is not in this model ({', '.join(parts)}).{did_you_mean(name, table)}"
                " Was the LoRA trained for another base model?"
            )
        target, path = table[name]
        host = parts[target].get_submodule(path)
        _check_shape(lora.path, name, host, weights)
        out[(target, path)] = weights
    return out


def _check_shape(source: str, name: str, host: nn.Module, weights: LoraWeights) -> None:
    expected = tuple(host.weight.shape)
    got = tuple(weights.up.shape[:1]) + tuple(weights.down.shape[1:])
    if expected != got:
        raise LoraFileError(f"{source}: layer '{name}' has shape {got} but the model's layer is {expected}")


def write_lora_file(
    path: str | os.PathLike,
    layers: Iterable[ExportLayer],
    *,
    fmt: str = "kohya",
    kind: str = "sd",
    metadata: Optional[Mapping[str, str]] = None,
    dtype: str = "float32",
) -> str:
    """Write ``layers`` as a ``fmt`` ("kohya" | "peft") file; return its path."""
    from safetensors.torch import save_file

    layers = list(layers)
    if not layers:
        raise ValueError("no LoRA layers to write")
    meta: Dict[str, str] = {"format": "pt", **(metadata or {})}
    if fmt == "kohya":
        tensors = kohya_format.to_kohya(layers, kind)
    elif fmt == "peft":
        tensors, extra = peft_format.to_peft(layers)
        meta.update(extra)
    else:
        raise ValueError(f"unknown LoRA file format {fmt!r}")
    torch_dtype = DTYPES[dtype]
    # Scalars (kohya's alpha) stay float32: a half-precision alpha would shift the scale.
    tensors = {
        k: v.detach().to("cpu", torch_dtype if v.dim() else torch.float32).contiguous() for k, v in tensors.items()
    }
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # never leave a half-written file under the final name
    return path
