"""Model loading helpers every family shares: the load error, what a missing path means, the
single-file suffixes, parts of a diffusers folder built without their weights, fp16-only weights.

Each family's own loader (Stable Diffusion's in the ``sd``/``sdxl`` family plugin, the flow
families' in theirs) reads its model with these; the core never loads a model but through a family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from ..errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(UserError):
    """A model that cannot be loaded from what is on disk."""


def skeleton_part(cls: Any, where: Union[str, Path], part: str, *, prediction_type: Optional[str] = None) -> Any:
    """One part of a diffusers folder without its weights: a model built from its config on the
    ``meta`` device; tokenizers and schedulers (small, needed to check prompts) are real."""
    import torch

    where = str(where)
    if part.startswith("tokenizer"):
        return cls.from_pretrained(where, local_files_only=True)
    if part == "scheduler":
        kwargs = {"prediction_type": prediction_type} if prediction_type else {}
        return cls.from_config(cls.load_config(where), **kwargs)
    if hasattr(cls, "load_config"):  # diffusers models
        with torch.device("meta"):
            return cls.from_config(cls.load_config(where))
    from transformers import AutoConfig  # transformers models

    model_config = AutoConfig.from_pretrained(where, local_files_only=True)
    with torch.device("meta"):
        return cls(model_config)


def weights_variant(part_dir: Path) -> Optional[str]:
    """"fp16" when a part only ships ``*.fp16.*`` weights (a common way to publish half-size models)."""
    names = [p.name for p in part_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
    plain = [n for n in names if n.count(".") == 1]
    if not plain and any(".fp16." in n for n in names):
        return "fp16"
    return None


def missing_model_message(pretrained: str) -> str:
    """Why a model path does not load: it does not exist (and what to do instead)."""
    message = f"model '{pretrained}' not found: there is no such file or folder."
    looks_like_repo = pretrained.count("/") == 1 and not pretrained.startswith((".", "/", "~"))
    if looks_like_repo:
        message += (
            " hcp reads models from local files only; download the repository first "
            f"(e.g. `huggingface-cli download {pretrained} --local-dir DIR`) and set model.pretrained to DIR."
        )
    else:
        message += (
            " Set model.pretrained to a local diffusers folder (with model_index.json) or a "
            ".safetensors/.ckpt file; hcp_core.demo.model.build_demo_model writes a tiny offline one."
        )
    return message
