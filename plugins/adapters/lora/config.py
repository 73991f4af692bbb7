"""What a ``[[lora_unet]]`` / ``[[lora_text_encoder]]`` group and the ``[lora]`` table hold.

Light on purpose (attrs only, no torch): plugin discovery imports it. Validators raise
``ValueError(message, attribute)`` so the config converter reports the dotted path.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

import attrs

from hcp_core.config.validators import at_least, describe_range, fail, in_range, one_of
from hcp_core.models.layer_select import compile_pattern

EXPORT_FORMATS = ("kohya", "peft")
SAVE_DTYPES = ("float32", "float16", "bfloat16")
#: Largest integer rank: beyond any layer of SD/SDXL (the adapter also caps it to the layer's size).
MAX_RANK = 4096
#: alpha / rank scales the LoRA output; beyond this the update swamps the host layer.
MAX_ALPHA = 65536.0

_INT_RANK = describe_range(1, MAX_RANK)
_FLOAT_RANK = describe_range(0, 1, low_open=True)


def _check_rank(inst: Any, attribute: attrs.Attribute, value: Union[int, float]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(attribute, f"must be an integer rank or a fraction of the output channels, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= MAX_RANK:
            fail(attribute, f"an integer rank must be {_INT_RANK}, got {value!r}")
    elif not 0.0 < value <= 1.0:  # NaN fails this too
        hint = f"; for a fixed rank write rank = {int(value)}" if value > 1 and float(value).is_integer() else ""
        fail(
            attribute,
            f"a float rank is a fraction of the layer's output channels and must be {_FLOAT_RANK}, got {value!r}{hint}",
        )


def _check_layers(inst: Any, attribute: attrs.Attribute, value: Optional[List[str]]) -> None:
    if value is None:  # left out: the model family's default layers for the part
        return
    if not value:
        fail(attribute, "list at least one layer name or 're:' pattern, or leave layers out for the model "
                        "family's default layers (its attention and MLP layers)")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            fail(attribute, f"layer patterns must be non-empty strings, got {pattern!r}")
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            fail(attribute, str(exc))


def _check_init_from(inst: Any, attribute: attrs.Attribute, value: Optional[str]) -> None:
    if value is not None and not value.endswith(".safetensors"):
        fail(attribute, f"must be a .safetensors LoRA file, got {value!r}")


def _check_dora(inst: Any, attribute: attrs.Attribute, value: bool) -> None:
    if value and inst.svd_init:
        fail(attribute, "dora = true cannot be combined with svd_init = true in one group; drop one of them")


@attrs.define
class LoraGroupConfig:
    """One LoRA group: which layers get a LoRA, its rank and scale, and its learning rate.

    Output of a layer = host(x) + (alpha / rank) * up(down(dropout(x))); ``up`` starts at zero.
    """

    #: Layer names from ``model.named_modules()`` or ``re:`` patterns; a container means every
    #: nn.Linear and nn.Conv2d inside it. Left out (None): the model family's default layers for
    #: this part (its ``default_layers``: the attention and MLP layers); an empty list is an error.
    layers: Optional[List[str]] = attrs.field(default=None, validator=_check_layers)
    lr: float = attrs.field(default=1e-4, validator=at_least(0))
    #: An int is the rank; a float in (0, 1] is a fraction of each layer's output channels
    #: (``max(1, round(out * rank))``).
    rank: Union[int, float] = attrs.field(default=4, validator=_check_rank)
    #: Output scale = alpha / rank.
    alpha: float = attrs.field(default=1.0, validator=in_range(0, MAX_ALPHA, low_open=True))
    dropout: float = attrs.field(default=0.0, validator=in_range(0, 1, high_open=True))
    #: Start from the host weight's top singular vectors (the host keeps the rest, so the
    #: model's output at step 0 is unchanged).
    svd_init: bool = False
    #: A LoRA .safetensors file (kohya or PEFT layout) whose weights seed this group's layers;
    #: those layers take the file's rank and alpha. Relative to the pipeline's folder.
    init_from: Optional[str] = attrs.field(default=None, validator=_check_init_from)
    #: DoRA: the layer's weight becomes ``m * (W + dW) / ||W + dW||`` (norm per output channel)
    #: with a trained magnitude ``m`` that starts as ``||W||``. See docs/lora.md.
    dora: bool = attrs.field(default=False, validator=_check_dora)


@attrs.define
class LoraOptions:
    """The ``[lora]`` table: how LoRA files are written (one setting per run, not per group)."""

    #: "kohya" (webui/ComfyUI/diffusers keys) or "peft" (diffusers' own PEFT layout). Left out: the
    #: model family's usual layout, "kohya" for SD/SDXL and "peft" for diffusion transformers
    #: (FLUX, SD3). FLUX's kohya layout (BFL names, fused qkv) is written on request; SD3's is not.
    #: An SD/SDXL run with DoRA groups writes both when it is left out (peft as lora.safetensors,
    #: kohya as lora.kohya.safetensors; see docs/lora.md#dora).
    format: Optional[str] = attrs.field(default=None, validator=one_of(EXPORT_FORMATS))
    #: Tensor type of the exported file.
    save_dtype: str = attrs.field(default="float32", validator=one_of(SAVE_DTYPES))
