"""The ``lycoris`` adapter: LoHa / LoKr branches in the chosen layers, trained and exported.

Built by the training engine as ``build_lycoris_adapter(sections, context=..., options=...)``;
``sections`` maps a model part to the :class:`LycorisGroupConfig` of every ``[[lycoris_unet]]``,
``[[lycoris_transformer]]``, ``[[lycoris_text_encoder]]`` ... table, ``options`` is the
``[lycoris]`` table. Everything but the branch and the file layout is the LoRA adapter's: layer
selection (and the family's default layers), one optimizer group per table, per-layer seeds,
``init_from``, checkpoint state, kohya module names and ``ss_*`` metadata.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from hcp_core.errors import UserError
from hcp_core.export_names import export_file_name
from hcp_core.interfaces import AdapterContext, ModelBundle

from ..lora.adapter import LoraAdapter, options_from
from ..lora.lora_file import LayerWeights, save_adapter_tensors
from ..lora.naming import canonical_path
from ..lora.weights import ExportLayer
from .algorithms import LycorisBranch, LycorisWeights, lycoris_shapes
from .config import LycorisGroupConfig, LycorisOptions
from .files import LycorisFile, match_lycoris_layers, read_lycoris_file, to_lycoris
from .naming import lycoris_prefix

SECTIONS = {"unet": "lycoris_unet", "transformer": "lycoris_transformer", "text_encoder": "lycoris_text_encoder",
            "text_encoder_2": "lycoris_text_encoder_2", "text_encoder_3": "lycoris_text_encoder_3"}
FINAL_NAME = "lycoris.safetensors"


def lycoris_file_name(step: Optional[int], context: Optional[AdapterContext] = None) -> str:
    """``lycoris.safetensors`` for the final export, ``lycoris-<step>.safetensors`` for checkpoints;
    ``<output_name>-lycoris[-<step>].safetensors`` with ``output_name`` (never the LoRA's name)."""
    return export_file_name(context, FINAL_NAME.removesuffix(".safetensors"), step, tag="lycoris")


class LycorisAdapter(LoraAdapter):
    """LoHa / LoKr groups; see the module docstring."""

    section_names = SECTIONS
    options_key = "lycoris"
    noun = "LyCORIS"

    def _options(self, value: Any) -> LycorisOptions:
        return options_from(value, LycorisOptions, "lycoris")

    @property
    def file_format(self) -> str:
        """Always LyCORIS's kohya-style layout (:mod:`.files`)."""
        return "lycoris"

    def _check_format(self, models: ModelBundle) -> None:
        for target in self.sections:
            try:
                lycoris_prefix(target, self._kind)
            except ValueError:
                raise UserError(f"[[{SECTIONS.get(target, target)}]]: LyCORIS files have no key names for the "
                                f"{target} of a {self._kind} model") from None

    def _make_branch(self, target: str, name: str, host: nn.Module, group: LycorisGroupConfig,
                     seed: Optional[Any]) -> LycorisBranch:  # fmt: skip
        if seed is not None:  # continue from a file: its shapes, rank and alpha win (algorithm checked by _seed_layers)
            shapes = {k: tuple(v.shape) for k, v in seed.tensors.items()}
            alpha = seed.alpha if seed.alpha is not None else float(seed.rank)
            branch = LycorisBranch(host, seed.algo, shapes, seed.rank, alpha, group.dropout)
            with torch.no_grad():
                for key, tensor in branch.state_tensors().items():
                    tensor.copy_(seed.tensors[key])
        else:
            shapes = lycoris_shapes(group.algo, host, group.rank, factor=group.factor,
                                    decompose_both=group.decompose_both, full_matrix=group.full_matrix)
            branch = LycorisBranch(host, group.algo, shapes, group.rank, group.alpha, group.dropout)
            branch.reset(self._generator(f"{target}.{name}"))
        branch.requires_grad_(True)
        return branch

    def _seed_layers(self, label: str, group: LycorisGroupConfig, target: str, model: nn.Module) -> LayerWeights:
        """The file's layers for ``target``; each must be of the group's algorithm."""
        layers = super()._seed_layers(label, group, target, model)
        for (_, name), seed in layers.items():
            algo = seed.algo if isinstance(seed, LycorisWeights) else "a plain LoRA"
            if algo != group.algo:
                raise UserError(f"{label}.init_from: layer '{name}' is {algo} in the file but this group has "
                                f"algo = {group.algo!r}; seed it from a group of the same algorithm")
        return layers

    def _read_file(self, path: str) -> LycorisFile:
        return read_lycoris_file(path)

    def _match_file(self, lyc: LycorisFile, target: str, model: nn.Module) -> LayerWeights:
        prefix = lycoris_prefix(target, self._kind) + "_"
        own = LycorisFile(lyc.path, {k: v for k, v in lyc.weights.items() if k.startswith(prefix)}, lyc.metadata)
        return match_lycoris_layers(own, {target: model}, self._kind)

    # ------------------------------------------------------------------ export
    def export_layers(self, models: ModelBundle) -> List[ExportLayer]:
        """Every layer as a file holds it (:class:`LycorisWeights`)."""
        return [ExportLayer(layer.target, canonical_path(layer.target, models.part(layer.target), layer.name),
                            layer.branch.weights()) for layer in self.layers.values()]  # fmt: skip

    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        """Write ``lycoris.safetensors`` (``step`` None) or ``lycoris-<step>.safetensors`` into ``out_dir``."""
        layers = self.export_layers(models)
        path = os.path.join(out_dir, lycoris_file_name(step, self.context))
        tensors = to_lycoris(layers, self._kind)
        return [save_adapter_tensors(path, tensors, self.metadata(models, layers, step), self.options.save_dtype)]

    def metadata(self, models: ModelBundle, layers: Sequence[ExportLayer], step: Optional[int]) -> Dict[str, str]:
        """LoRA's ``ss_*`` / ``hcp_*`` facts, naming LyCORIS as kohya's sd-scripts do for its networks."""
        meta = super().metadata(models, layers, step)
        algos = Counter(layer.weights.algo for layer in layers)
        algo = algos.most_common(1)[0][0]
        groups = [g for gs in self.sections.values() for g in gs if g.algo == algo]
        args = {"algo": algo}
        if algo == "lokr":
            args.update(factor=str(groups[0].factor), decompose_both=str(groups[0].decompose_both),
                        full_matrix=str(groups[0].full_matrix))
        if groups[0].dropout:
            args["dropout"] = str(groups[0].dropout)
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps(args)
        meta["hcp_algos"] = json.dumps(dict(algos), sort_keys=True)
        return meta

    def _group_facts(self, group: LycorisGroupConfig) -> Dict[str, Any]:
        facts: Dict[str, Any] = {"algo": group.algo, "rank": group.rank, "alpha": group.alpha}
        if group.algo == "lokr":
            facts.update(factor=group.factor, decompose_both=group.decompose_both, full_matrix=group.full_matrix)
        return facts


def build_lycoris_adapter(sections: Mapping[str, Sequence[LycorisGroupConfig]], *, context: AdapterContext,
                          options: Any = None) -> LycorisAdapter:  # fmt: skip
    """The registered factory (see :class:`LycorisAdapter`)."""
    return LycorisAdapter(sections, context=context, options=options)
