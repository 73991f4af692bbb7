"""Config of a ``[[unet]]`` / ``[[text_encoder]]`` fine-tune group and the ``[finetune]`` options table (light: no torch import)."""
from __future__ import annotations

from typing import Any, List

import attrs

from hcp_core.config.validators import fail, greater_than, one_of

#: What a fine-tune run can write: its trained tensors, a diffusers folder, an original-layout file.
EXPORTS = ("trained", "diffusers", "single_file")
#: Tensor types of the full-model exports.
EXPORT_DTYPES = ("fp16", "bf16", "fp32")


def _non_empty(inst, attribute, value) -> None:
    if not value:
        raise ValueError("must name at least one layer (a module name or 're:' + regex)", attribute)


def _check_exports(inst: Any, attribute: attrs.Attribute, value: List[str]) -> None:
    if not isinstance(value, list) or not value:
        fail(attribute, f"list at least one of {', '.join(repr(e) for e in EXPORTS)}, e.g. export = [\"trained\", \"diffusers\"]")
    for item in value:
        if item not in EXPORTS:
            fail(attribute, f"unknown export {item!r}; choose from {', '.join(repr(e) for e in EXPORTS)}")
    if len(set(value)) != len(value):
        fail(attribute, f"lists an export twice: {value!r}")


@attrs.define
class FinetuneGroup:
    """Train every parameter of the selected layers with learning rate ``lr``."""

    layers: List[str] = attrs.field(validator=_non_empty)
    lr: float = attrs.field(default=1e-6, validator=greater_than(0))


@attrs.define
class FinetuneOptions:
    """The ``[finetune]`` table: what a fine-tune run writes at each save and at the end."""

    #: "trained": ``finetune.safetensors``, the trained tensors only (fp32, small); "diffusers": the
    #: whole model as a diffusers folder ``model/``; "single_file": the whole model as one
    #: original-layout checkpoint ``model.safetensors`` (SD 1.x and SDXL), what webui and ComfyUI load.
    export: List[str] = attrs.field(factory=lambda: ["trained"], validator=_check_exports)
    #: Tensor type of the full-model exports ("diffusers", "single_file").
    export_dtype: str = attrs.field(default="fp16", validator=one_of(EXPORT_DTYPES))
    #: false: full models only at the end of the run (each save still writes the trained tensors).
    export_every_save: bool = True
