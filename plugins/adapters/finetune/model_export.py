"""A fine-tuned model written whole: a diffusers folder and an original-layout single file.

**Which weights.** :class:`BaseWeights` notes, when the fine-tune attaches (before LoRA or prompt
tuning change any module), every part's own tensor names. An export writes exactly those, as the
model holds them now: the trained layers' current (or EMA) values and the frozen rest. Tensors of
other adapters of the same run (LoRA branches, custom words) are not merged in: those adapters
export their own files. Names are the canonical ones (``text_model.*`` for CLIP, see
:mod:`hcp_core.models.module_names`), which transformers 4 and 5, webui and ComfyUI read.

**Memory.** Nothing is copied whole: the tensors are the model's own, cast to the export dtype and
moved to the CPU one at a time while the file is written
(:mod:`hcp_core.tools.safetensors_writer`), so saving needs about one tensor's size of extra
memory, not a second model (tests/test_finetune_export.py measures the peak).

**Atomic.** The folder is written under a temporary name beside its final one and renamed when
complete (:func:`hcp_core.fileio.atomic_folder`); the single file likewise (``atomic_write``).
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from hcp_core.errors import ConfigError, UserError
from hcp_core.fileio import atomic_folder
from hcp_core.interfaces import ModelBundle
from hcp_core.models.module_names import canonical_path
from hcp_core.tools.safetensors_writer import write_sharded
from hcp_plugins.models.stable_diffusion.single_file import single_file_problem
from hcp_plugins.models.stable_diffusion.single_file import write_single_file as write_original_layout

#: Export dtype names of the ``[finetune]`` table.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: diffusers' pipeline class of each built-in family; other families: the source's model_index.json.
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}  # fmt: skip
#: Pipeline arguments that keep images untouched (no safety checker, no watermark) when present.
_QUIET_ARGS = {"requires_safety_checker": False, "add_watermarker": False}


class BaseWeights:
    """Every part's own tensor names (and parameters), noted before other adapters wrap modules."""

    def __init__(self, models: ModelBundle) -> None:
        self.keys: Dict[str, List[str]] = {}
        self.params: Dict[str, Dict[str, torch.nn.Parameter]] = {}
        for part, module in models.modules().items():
            self.keys[part] = list(module.state_dict().keys())
            self.params[part] = dict(module.named_parameters())

    def state(self, part: str, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The part's tensors now, under canonical names; each storage once (tied weights).

        A parameter whose module another adapter moved (prompt tuning keeps the token table as
        ``token_embedding.original``) is found by identity: parameters keep their object when
        models move between devices or precisions."""
        # Not state_dict(): FSDP's hooks would swap its gathered whole weights back to shards.
        now = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
        out: Dict[str, torch.Tensor] = {}
        seen = set()
        for key in self.keys[part]:
            value = now.get(key)
            if value is None:
                value = self.params[part].get(key)
            if value is None:
                raise UserError(f"finetune export: the {part}'s tensor '{key}' is no longer in the model; another "
                                "adapter replaced its module. Export 'trained' only, or train that adapter in a separate run.")
            ptr = (value.device, value.data_ptr()) if value.numel() else None
            if ptr is not None and ptr in seen:
                continue  # a tied weight (T5's shared embedding): loaders tie it again
            seen.add(ptr)
            out[canonical_path(part, module, key)] = value.detach()
        return out


def pipeline_class_name(models: ModelBundle) -> str:
    """The diffusers pipeline class of ``models`` (built-in families by kind, else the source folder's)."""
    name = PIPELINE_CLASSES.get(models.kind)
    index = Path(models.source or "") / "model_index.json"
    if name is None and index.is_file():
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    if name is None:
        raise ConfigError(f"finetune.export: hcp does not know the diffusers pipeline of {models.kind} models, so it "
                          "cannot write a diffusers folder; remove \"diffusers\" from finetune.export")
    return str(name)


def _pipeline(models: ModelBundle) -> Any:
    """The diffusers pipeline around the bundle's modules (nothing copied), for its model_index.json."""
    from hcp_core.models import pipelines

    name = pipeline_class_name(models)
    cls = pipelines.pipeline_class(name)  # hcp's quiet import (no torchvision warning)
    kwargs: Dict[str, Any] = {}
    for arg, param in inspect.signature(cls.__init__).parameters.items():
        if arg == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        part = getattr(models, arg, None)
        if part is not None:
            kwargs[arg] = part
        elif arg in _QUIET_ARGS:
            kwargs[arg] = _QUIET_ARGS[arg]
        elif param.default is inspect.Parameter.empty:
            kwargs[arg] = None  # e.g. SD's safety_checker and feature_extractor: not part of hcp's models
    return cls(**kwargs)


def _write_module_config(module: torch.nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """``config.json``: diffusers' own, or transformers' with the export dtype recorded."""
    from diffusers import ModelMixin

    if isinstance(module, ModelMixin):
        module.save_config(str(folder))
        return
    config = copy.deepcopy(module.config)
    config.dtype = dtype  # what from_pretrained(dtype="auto") loads it as
    config.save_pretrained(str(folder))


def write_diffusers_folder(models: ModelBundle, base: BaseWeights, path: Path, dtype: torch.dtype) -> Path:
    """The whole model as a diffusers folder at ``path`` (model_index.json and every part), the
    modules' floating-point weights in ``dtype``; written under a temporary name, then renamed."""
    from diffusers import ModelMixin

    def write(tmp: Path) -> None:
        pipe = _pipeline(models)
        pipe.save_config(str(tmp))  # model_index.json: each part's library and class
        index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue  # settings (requires_safety_checker) and absent parts (safety_checker)
            component = getattr(pipe, name)
            folder = tmp / name
            folder.mkdir()
            if isinstance(component, torch.nn.Module):
                _write_module_config(component, folder, dtype)
                stem = "diffusion_pytorch_model" if isinstance(component, ModelMixin) else "model"
                write_sharded(folder, stem, base.state(name, component), dtype=dtype)
            else:  # tokenizers, the scheduler: small
                component.save_pretrained(str(folder))

    return atomic_folder(path, write)


def check_single_file(models: ModelBundle) -> None:
    """A :class:`ConfigError` when ``models`` has no single-file layout in hcp."""
    problem = single_file_problem(models)
    if problem is not None:
        raise ConfigError(f"finetune.export: \"single_file\": {problem}; remove \"single_file\" from finetune.export")


def write_single_file(models: ModelBundle, base: BaseWeights, path: Path, dtype: torch.dtype,
                      metadata: Optional[Dict[str, str]] = None) -> Path:
    """The whole model (SD 1.x or SDXL) as one original-layout ``.safetensors`` at ``path``, in ``dtype``."""
    check_single_file(models)
    return write_original_layout(models, path, dtype, part_state=base.state, metadata=metadata)
