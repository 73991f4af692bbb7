"""Read and write LoRA .safetensors files in either layout, and match them to a model's layers."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from hcp_core.errors import UserError, did_you_mean
from hcp_core.fileio import atomic_write

from . import flux_kohya, kohya_format, peft_format
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
    """Load a kohya- or PEFT-layout LoRA file (float32 tensors), validated.

    This is the one way hcp reads LoRA files (``hcp generate --lora``, ``merge-lora``,
    ``init_from``), so every reader gets the same checks (:func:`validate_lora_tensors`,
    :func:`validate_lora_layer`): a broken file is a :class:`LoraFileError` naming it and the
    key, never a traceback or a NaN image.
    """
    path = str(path)
    metadata, tensors = read_adapter_tensors(path)
    if kohya_format.is_kohya(tensors):
        layout, parse = "kohya", lambda: kohya_format.from_kohya(tensors, source=path)
        keys = (kohya_format.DOWN, kohya_format.UP)
    elif peft_format.is_peft(tensors):
        layout, parse = "peft", lambda: peft_format.from_peft(tensors, metadata, source=path)
        keys = (peft_format.A, peft_format.B)
    else:
        raise LoraFileError(
            f"{path}: no LoRA weights found (expected '*.lora_down.weight' kohya keys or '*.lora_A.weight' PEFT keys)"
        )
    try:
        weights = parse()
    except (ValueError, TypeError) as exc:  # PEFT metadata that is not JSON, an alpha that is not a number
        raise LoraFileError(f"{path}: unreadable LoRA metadata ({exc}); export the file again") from None
    for name, layer in weights.items():
        validate_lora_layer(path, name, layer, down_key=name + keys[0], up_key=name + keys[1])
    return LoraFile(path, layout, weights, metadata)


def read_adapter_tensors(path: str, what: str = "LoRA") -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """(metadata, float32 tensors) of an adapter ``.safetensors`` file, checked by
    :func:`validate_lora_tensors`; a missing or unreadable file is a :class:`LoraFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not os.path.isfile(path):
        raise LoraFileError(f"{what} file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise LoraFileError(
            f"{path}: not a readable .safetensors file ({str(exc).strip() or type(exc).__name__}); "
            f"it may be truncated, or another format ({what} files are .safetensors): download or export it again"
        ) from None
    validate_lora_tensors(path, tensors)
    return metadata, {k: v.float() for k, v in tensors.items()}


def validate_lora_tensors(source: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of a LoRA file is floating point and finite; every ``*.alpha`` is one finite number.

    Raises :class:`LoraFileError` naming ``source`` and the first bad key.
    """
    for key, tensor in tensors.items():
        if key.endswith(kohya_format.ALPHA):
            if tensor.numel() != 1:
                raise LoraFileError(
                    f"{source}: '{key}' must be a single number (scale = alpha / rank), got shape {tuple(tensor.shape)}"
                )
            tensor = tensor.float()  # some exporters store an integer alpha, which is fine
        elif not tensor.is_floating_point():
            raise LoraFileError(
                f"{source}: '{key}' has dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA weights must be "
                "floating point (float32, float16 or bfloat16). The file is not a LoRA export, or a broken one."
            )
        if not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise LoraFileError(
                f"{source}: '{key}' holds {bad} values; the LoRA was saved from a diverged run. "
                "Use an earlier checkpoint's file."
            )


def validate_lora_layer(source: str, name: str, weights: LoraWeights, *, down_key: str, up_key: str) -> None:
    """One layer's factors fit each other: ``down`` [r, in] / [r, in, kh, kw], ``up`` [out, r] /
    [out, r, 1, 1], rank at least 1, a finite alpha. Raises :class:`LoraFileError` naming the key."""
    down, up = tuple(weights.down.shape), tuple(weights.up.shape)
    if len(down) not in (2, 4) or 0 in down:
        raise LoraFileError(
            f"{source}: '{down_key}' has shape {down}; a LoRA down factor is [rank, in] (or [rank, in, kh, kw] for a convolution)"
        )
    expected = f"[out, {down[0]}]" if len(down) == 2 else f"[out, {down[0]}, 1, 1]"
    if len(up) != len(down) or 0 in up or up[1] != down[0] or up[2:] not in ((), (1, 1)):
        raise LoraFileError(
            f"{source}: '{up_key}' has shape {up} but '{down_key}' has shape {down} (rank {down[0]}); "
            f"the up factor must be {expected}. The file is damaged or not a plain LoRA."
        )
    if not math.isfinite(weights.alpha):
        raise LoraFileError(f"{source}: layer '{name}' has alpha = {weights.alpha}; alpha must be a finite number")
    if weights.magnitude is not None:
        channels = up[0] if weights.axis == "output" else down[1]
        if weights.magnitude.numel() != channels:
            raise LoraFileError(f"{source}: layer '{name}' has a DoRA magnitude of {weights.magnitude.numel()} values "
                                f"but {channels} {weights.axis} channels")


def match_layers(lora: LoraFile, parts: Mapping[str, nn.Module], kind: str = "sd") -> LayerWeights:
    """The file's layers as (model part, native path) of ``parts``, shapes checked.

    A module the model does not have, or whose shape differs, is an error naming it: applying
    half a LoRA silently is worse than not applying it.
    """
    reader = KOHYA_READERS.get(kind) if lora.layout == "kohya" else None
    if reader is not None:  # a family whose kohya names are not SD's (FLUX: BFL's, fused): to dotted names
        try:
            lora = LoraFile(lora.path, "peft", reader(lora.weights, parts, lora.path), lora.metadata)
        except ValueError as exc:
            raise LoraFileError(str(exc)) from None
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


#: Model kinds whose kohya layout is not SD/SDXL's: kind -> writer ``(layers, kind) -> tensors``.
KOHYA_WRITERS = {"flux": flux_kohya.to_flux_kohya}
#: ... and their readers: kind -> ``(layers by kohya name, model parts, source) -> layers by <part>.<path>``.
KOHYA_READERS = {"flux": flux_kohya.split_flux_kohya}


def write_lora_file(
    path: str | os.PathLike,
    layers: Iterable[ExportLayer],
    *,
    fmt: str = "kohya",
    kind: str = "sd",
    metadata: Optional[Mapping[str, str]] = None,
    dtype: str = "float32",
) -> str:
    """Write ``layers`` as a ``fmt`` ("kohya" | "peft") file; return its path.

    Layers of a diffusion transformer (``transformer``) or a T5 encoder have no kohya (SD/SDXL)
    name: ``fmt="kohya"`` is a ``ValueError`` for them.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("no LoRA layers to write")
    meta: Dict[str, str] = {"format": "pt", **(metadata or {})}
    if fmt == "kohya":
        try:
            tensors = KOHYA_WRITERS.get(kind, kohya_format.to_kohya)(layers, kind)
        except ValueError as exc:  # a transformer / T5 layer: kohya's SD layout has no name for it
            raise ValueError(f"{exc}; write such LoRA layers with fmt='peft' (diffusers' layout)") from None
    elif fmt == "peft":
        tensors, extra = peft_format.to_peft(layers)
        meta.update(extra)
    else:
        raise ValueError(f"unknown LoRA file format {fmt!r}")
    return save_adapter_tensors(path, tensors, meta, dtype)


def save_adapter_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                         dtype: str = "float32") -> str:  # fmt: skip
    """Write an adapter file: tensors in ``dtype`` (scalars float32), ``metadata``, atomically; its path."""
    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype]
    # Scalars (kohya's alpha) stay float32: a half-precision alpha would shift the scale.
    cpu = {k: v.detach().to("cpu", torch_dtype if v.dim() else torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **metadata}
    path = str(path)
    # Never a half-written file under the final name; mode 0644 under umask 022.
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=meta))
    return path
