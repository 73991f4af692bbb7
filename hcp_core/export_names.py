"""File names of an adapter's exports, with the pipeline's ``output_name``.

Without ``output_name`` every adapter keeps its own names (``lora.safetensors``,
``finetune.safetensors``, ``embeddings/<word>.pt``). With ``output_name = "mystyle"`` they start
with it, so files of several runs can share one webui/ComfyUI folder: ``mystyle.safetensors``,
and ``mystyle-<step>.safetensors`` for the exports saved with checkpoints. The engine passes the
name to adapters in ``AdapterContext.extra[OUTPUT_NAME]``.
"""
from __future__ import annotations

from typing import Any, Optional

#: The ``AdapterContext.extra`` key that holds the pipeline's ``output_name`` (None: not set).
OUTPUT_NAME = "output_name"


def output_name(context: Any) -> Optional[str]:
    """The pipeline's ``output_name`` as an adapter's build context carries it (None: not set)."""
    extra = getattr(context, "extra", None) or {}
    return extra.get(OUTPUT_NAME)


def export_file_name(context: Any, default: str, step: Optional[int], *, tag: str = "",
                     suffix: str = ".safetensors") -> str:
    """``<stem>[-<step>]<suffix>``: ``stem`` is ``default`` without ``output_name``, else
    ``output_name`` followed by ``-<tag>`` when ``tag`` is given (an adapter whose file would
    otherwise collide with another's, e.g. ``mystyle-finetune.safetensors`` next to the LoRA).
    ``step`` None is the final export."""
    name = output_name(context)
    stem = default if name is None else (f"{name}-{tag}" if tag else name)
    return f"{stem}{suffix}" if step is None else f"{stem}-{step}{suffix}"
