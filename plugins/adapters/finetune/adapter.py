"""Full fine-tuning of chosen layers: ``[[unet]]`` / ``[[transformer]]`` and ``[[text_encoder]]`` groups.

Each group trains every parameter of the modules its ``layers`` select (a module name from
``named_modules()`` means the module and everything inside it; ``re:`` + regex uses ``re.match``)
with its own learning rate; everything not named stays frozen. The export names each tensor
``<part>.<parameter path>`` (``unet.``, ``transformer.``, ``text_encoder.`` ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from safetensors.torch import save_file

from hcp_core.errors import ConfigError, UserError
from hcp_core.fileio import atomic_write
from hcp_core.interfaces import AdapterContext, ModelBundle
from hcp_core.models.layer_select import select_modules


class FinetuneAdapter:
    """Unfreezes the selected modules; exports the trained tensors under their diffusers names."""

    #: Layers are selected by their original names, so this attaches before wrapping adapters (LoRA).
    attach_order = -10

    def __init__(self, sections: Mapping[str, List[Any]], *, context: AdapterContext) -> None:
        self.sections = sections
        self.context = context
        self.params: Dict[str, torch.nn.Parameter] = {}

    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
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
                for mod_name, module in selected.items():
                    for p_name, param in module.named_parameters():
                        full = f"{target}.{mod_name}.{p_name}" if mod_name else f"{target}.{p_name}"
                        names.setdefault(full, param)
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
                    self.params[full] = param
                    group_params.append(param)
                groups.append({"params": group_params, "lr": cfg.lr, "name": f"{target}[{gi}]"})
        return groups

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.params.items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])

    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        name = "finetune.safetensors" if step is None else f"finetune-{step}.safetensors"
        path = Path(out_dir) / name
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.params.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "hcp-finetune", "base_model": models.source}))
        return [str(path)]
