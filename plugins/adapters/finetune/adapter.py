"""Full fine-tuning of chosen layers: ``[[unet]]`` / ``[[transformer]]`` and ``[[text_encoder]]`` groups.

Each group trains every parameter of the modules its ``layers`` select (a module name from
``named_modules()`` means the module and everything inside it; ``re:`` + regex uses ``re.match``)
with its own learning rate; everything not named stays frozen.

Exports (``[finetune].export``, at each save and at the end; the end's with EMA weights when
``train.ema`` is on):

* ``"trained"``: ``finetune.safetensors`` with the trained tensors only, fp32, each named
  ``<part>.<parameter path>`` (``unet.``, ``transformer.``, ``text_encoder.`` ...);
* ``"diffusers"``: the whole model as a diffusers folder ``model/`` (``DiffusionPipeline.from_pretrained``);
* ``"single_file"``: the whole model as one original-layout checkpoint ``model.safetensors`` (SD 1.x,
  SDXL), what webui and ComfyUI load.

Checkpoint-time exports carry the step: ``finetune-<N>.safetensors``, ``model-<N>/``,
``model-<N>.safetensors`` (whole models not at the run's last step, whose final export follows,
nor at all with ``export_every_save = false``); with the pipeline's ``output_name`` the names start with it
(``<name>-finetune``, ``<name>-model``, see :mod:`hcp_core.export_names`). See :mod:`.model_export` for how whole models are written.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors.torch import save_file

from hcp_core.errors import ConfigError, UserError
from hcp_core.export_names import export_file_name
from hcp_core.fileio import atomic_write
from hcp_core.interfaces import AdapterContext, ModelBundle
from hcp_core.models.layer_select import select_modules

from .config import FinetuneOptions

log = logging.getLogger(__name__)


class FinetuneAdapter:
    """Unfreezes the selected modules; exports the trained tensors and, if asked, the whole model."""

    #: Layers are selected by their original names, so this attaches before wrapping adapters (LoRA).
    attach_order = -10

    def __init__(self, sections: Mapping[str, List[Any]], *, context: AdapterContext, options: Any = None) -> None:
        self.sections = sections
        self.context = context
        if options is not None and not isinstance(options, FinetuneOptions):
            raise TypeError(f"options must be a FinetuneOptions (the structured [finetune] table), got {options!r}")
        self.options = options if options is not None else FinetuneOptions()
        # Where each trained tensor lives, (module, attribute): read through the module each time, so
        # an engine that replaces parameters (FSDP's shards, its gathered whole weights) is followed.
        self._where: Dict[str, Tuple[torch.nn.Module, str]] = {}
        self.base: Any = None  # model_export.BaseWeights, for whole-model exports

    @property
    def params(self) -> Dict[str, torch.nn.Parameter]:
        """The trained tensors by name (``<part>.<parameter path>``), as their modules hold them now."""
        return {full: getattr(module, attr) for full, (module, attr) in self._where.items()}

    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
        self._prepare_model_exports(models)
        groups: List[Dict[str, Any]] = []
        owner: Dict[int, str] = {}
        for target, configs in self.sections.items():
            try:
                model = models.part(target)
            except ValueError as exc:  # e.g. [[transformer]] on an SD model, [[unet]] on FLUX
                raise UserError(f"[[{target}]]: {exc}") from None
            for gi, cfg in enumerate(configs):
                selected = select_modules(model, list(cfg.layers), what=f"{target}[{gi}].layers")
                names: Dict[str, torch.nn.Parameter] = {}
                places: Dict[str, Tuple[torch.nn.Module, str]] = {}
                for mod_name, module in selected.items():
                    for p_name, param in module.named_parameters():
                        full = f"{target}.{mod_name}.{p_name}" if mod_name else f"{target}.{p_name}"
                        names.setdefault(full, param)
                        owner_path, _, attr = p_name.rpartition(".")
                        places.setdefault(full, (module.get_submodule(owner_path), attr))
                group_params = []
                for full, param in names.items():
                    if id(param) in owner:
                        if owner[id(param)] == f"{target}:{gi}":
                            continue
                        raise ConfigError(
                            f"{target}[{gi}].layers: parameter '{full}' is already trained by group {owner[id(param)]}; "
                            "a parameter can belong to one group only"
                        )
                    owner[id(param)] = f"{target}:{gi}"
                    param.requires_grad_(True)
                    self._where[full] = places[full]
                    group_params.append(param)
                groups.append({"params": group_params, "lr": cfg.lr, "name": f"{target}[{gi}]"})
        return groups

    def _prepare_model_exports(self, models: ModelBundle) -> None:
        """Refuse exports the model has no layout for (before training), and note its own tensors."""
        wanted = set(self.options.export)
        if not wanted & {"diffusers", "single_file"}:
            return
        from .model_export import BaseWeights, check_single_file, pipeline_class_name

        if "single_file" in wanted:
            check_single_file(models)
        if "diffusers" in wanted:
            pipeline_class_name(models)
        self.base = BaseWeights(models)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.params.items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])

    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        """The exports of ``[finetune].export`` (see the module docstring); their paths."""
        from .model_export import DTYPES, write_diffusers_folder, write_single_file

        out, wanted = Path(out_dir), self.options.export
        paths: List[str] = []
        if "trained" in wanted:
            path = out / export_file_name(self.context, "finetune", step, tag="finetune")
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.params.items()}
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "hcp-finetune", "base_model": models.source}))
            paths.append(str(path))
        # The run's last step is saved just before the final export, which writes the same model
        # (with EMA weights, if on): a whole model is not written twice at the end.
        last = step is not None and step == self.context.extra.get("max_steps")
        if step is not None and (last or not self.options.export_every_save):
            return paths
        dtype = DTYPES[self.options.export_dtype]
        if "diffusers" in wanted:
            folder = out / export_file_name(self.context, "model", step, tag="model", suffix="")
            paths.append(str(write_diffusers_folder(models, self.base, folder, dtype)))
        if "single_file" in wanted:
            meta = {"hcp_base_model": models.source, "hcp_step": "final" if step is None else str(step)}
            file = out / export_file_name(self.context, "model", step, tag="model")
            paths.append(str(write_single_file(models, self.base, file, dtype, meta)))
        return paths
