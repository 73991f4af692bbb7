"""LoRA's file capabilities: which files it reads, and merging one into a model.

Registered as ``files=`` of the ``lora`` adapter; ``hcp generate --lora`` and ``hcp tools
merge-lora`` reach LoRA only through it (the core never imports this package).
"""
from __future__ import annotations

from typing import Any

from hcp_core.interfaces import FileHeader


class LoraFiles:
    """Reads kohya- (``*.lora_down.weight``) and PEFT-layout (``*.lora_A.weight``) ``.safetensors``."""

    def reads(self, header: FileHeader) -> bool:
        """True for a .safetensors file with kohya or PEFT LoRA keys."""
        from . import kohya_format, peft_format

        return header.safetensors and (kohya_format.is_kohya(header.keys) or peft_format.is_peft(header.keys))

    def apply(self, models: Any, path: str, weight: float) -> int:
        """``W += weight * scale * up @ down`` for every layer of the file; the number of layers."""
        from .merge import apply_lora_file

        return apply_lora_file(models, path, weight)
