"""The ``lora`` adapter: puts LoRA branches into the chosen layers, trains and exports them.

Built by the training engine as ``build_lora_adapter(sections, context=...)`` where ``sections``
maps a model part ("unet", "transformer", "text_encoder", ...) to the list of
:class:`LoraGroupConfig` of every ``[[lora_unet]]`` / ``[[lora_transformer]]`` /
``[[lora_text_encoder]]`` ... table. Settings for the files it writes come from
the ``[lora]`` table (:class:`LoraOptions`), handed over as ``context.extra["lora"]``.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from hcp_core.errors import ConfigError, UserError
from hcp_core.export_names import export_file_name
from hcp_core.interfaces import AdapterContext, ModelBundle
from hcp_core.models.layer_select import LayerSelectionError, compile_pattern, model_modules, select_layers

from .config import LoraGroupConfig, LoraOptions
from .dora import DoraBranch
from .layer import BRANCH_ATTR, LoraBranch, attach_branch, detach_branch, rank_for, warn_capped_ranks
from .lora_file import (KOHYA_READERS, KOHYA_WRITERS, LayerWeights, LoraFile, LoraFileError, match_layers,
                        read_lora_file, write_lora_file)
from .naming import BASE_MODEL_VERSIONS, canonical_path, default_format, is_transformer_family, kohya_prefix
from .svd import export_factors, max_svd_rank, restore_svd_start, svd_init
from .weights import ExportLayer, LoraWeights

log = logging.getLogger(__name__)

#: Pipeline section of each model part (for messages; the registration claims the same names).
SECTIONS = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_text_encoder",
            "text_encoder_2": "lora_text_encoder_2", "text_encoder_3": "lora_text_encoder_3"}
FINAL_NAME = "lora.safetensors"


@dataclass
class LoraLayer:
    """One injected branch and where it lives."""

    target: str
    name: str  # native module path in its model part
    group: str  # "lora_unet[0]"
    host: nn.Module
    branch: nn.Module  # a LoraBranch, or another adapter's branch (LoHa, LoKr)


def lora_file_name(step: Optional[int], context: Optional[AdapterContext] = None) -> str:
    """``lora.safetensors`` for the final export, ``lora-<step>.safetensors`` for checkpoints;
    ``<output_name>[-<step>].safetensors`` when the pipeline sets ``output_name``."""
    return export_file_name(context, FINAL_NAME.removesuffix(".safetensors"), step)


def options_from(value: Any, cls: type = LoraOptions, section: str = "lora") -> Any:
    """Structure the ``[lora]`` table (or another adapter's ``cls`` table named ``section``: a
    mapping, a ``cls`` or None) with dotted-path errors."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{section}: expected a table, got {value!r}")
    from hcp_core.config import convert
    from hcp_core.registry import Registry

    # LoraOptions names no component, so an empty registry structures it (no process-wide state).
    return convert.structure(convert.make_converter(Registry()), dict(value), cls, section)


class LoraAdapter:
    """See the module docstring; the methods are the Adapter protocol plus :meth:`detach`.

    Subclasses (the LyCORIS adapter) reuse layer selection, seeding, state and export by
    overriding :attr:`section_names`, :meth:`_make_branch`, :meth:`_read_file` and the export.
    """

    #: Pipeline section of each model part, for messages.
    section_names: Mapping[str, str] = SECTIONS
    #: The ``context.extra`` key of the options table.
    options_key = "lora"
    #: What messages call the adapter.
    noun = "LoRA"

    def __init__(
        self,
        sections: Mapping[str, Sequence[LoraGroupConfig]],
        *,
        context: AdapterContext,
        options: Any = None,
    ) -> None:
        self.sections = {target: list(groups) for target, groups in sections.items() if groups}
        self.context = context
        self.options = self._options(options if options is not None else context.extra.get(self.options_key))
        self.layers: Dict[str, LoraLayer] = {}  # "<part>.<path>" -> layer
        self._patterns: Dict[str, List[str]] = {}  # "lora_unet[0]" -> the layer patterns it used
        self._files: Dict[str, LoraFile] = {}
        self._kind = "sd"
        self._transformer_family = False

    def _options(self, value: Any) -> Any:
        return options_from(value)

    # ------------------------------------------------------------------ attach
    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
        """Inject a branch into every selected layer; one optimizer parameter group per config group.

        On an error nothing stays attached.
        """
        if self.layers:
            raise RuntimeError("this adapter is already attached")
        self._kind = getattr(models, "kind", "sd") or "sd"
        self._transformer_family = is_transformer_family(models)
        self._check_format(models)
        param_groups: List[Dict[str, Any]] = []
        seeded_from: Dict[str, set] = {}  # init_from file -> layers taken from it
        try:
            for target, groups in self.sections.items():
                section = self.section_names.get(target, target)
                try:
                    model = models.part(target)
                except ValueError as exc:
                    raise UserError(f"{section}: {exc}") from None
                owner: Dict[str, str] = {}  # layer -> the group that has it
                for index, group in enumerate(groups):
                    label = f"{section}[{index}]"
                    params = self._attach_group(label, group, target, model, owner, seeded_from)
                    param_groups.append({"params": params, "lr": group.lr, "name": label})
        except BaseException:
            self.detach()
            raise
        self._warn_unused(seeded_from)
        warn_capped_ranks({name: layer.branch for name, layer in self.layers.items()})
        return param_groups

    def _check_format(self, models: ModelBundle) -> None:
        """Refuse a file layout this model's LoRA cannot be written in, before anything is attached."""
        if self.file_format == "peft":
            for target, groups in self.sections.items():
                if len({bool(g.dora) for g in groups}) > 1:
                    raise UserError(
                        f"{SECTIONS.get(target, target)}: some groups set dora = true and some do not; the PEFT layout "
                        "(diffusers) holds one DoRA setting per model part, so set dora the same in every group of "
                        "this part, or write format = \"kohya\""
                    )
        if not self._transformer_family:
            return
        if self.options.format == "kohya" and self._kind not in KOHYA_WRITERS:
            raise UserError(
                f"[lora] format = \"kohya\": hcp writes kohya's layout for SD, SDXL and FLUX only; for this {self._kind} "
                "model (a diffusion transformer) write format = \"peft\" or leave format out: diffusers' layout, which "
                "StableDiffusion3Pipeline.load_lora_weights, ComfyUI and hcp read"
            )
        if self.options.format == "kohya" and any(g.dora for groups in self.sections.values() for g in groups):
            raise UserError(f"[lora] format = \"kohya\": the kohya layout of this {self._kind} model fuses layers and "
                            "holds plain LoRA only, not DoRA; write format = \"peft\" or leave format out")
        # diffusers' FLUX and SD3 pipelines load LoRA for the transformer and the CLIP encoders only.
        for target in self.sections:
            module = getattr(models, target, None)
            if target.startswith("text_encoder") and module is not None and "T5" in type(module).__name__:
                log.warning(
                    "%s: LoRA on the T5 encoder is written and read back by hcp, but diffusers' "
                    "load_lora_weights for this %s model ignores it (it loads the transformer and CLIP encoders)",
                    SECTIONS.get(target, target), self._kind,
                )

    @property
    def file_format(self) -> str:
        """The layout files are written in: ``[lora] format``, or the model family's usual one
        (for an SD/SDXL run with DoRA, the peft layout diffusers loads as DoRA; see :meth:`export`)."""
        if self._dora_companion():
            return "peft"
        return self.options.format or default_format(self._transformer_family)

    def _dora_companion(self) -> bool:
        """True when ``format`` is left out on SD/SDXL and DoRA groups can be written in both layouts:
        ``lora.safetensors`` in the peft layout (diffusers reads DoRA only there) and
        ``lora.kohya.safetensors`` in the kohya one (webui, ComfyUI)."""
        dora = [{bool(getattr(g, "dora", False)) for g in groups} for groups in self.sections.values()]
        return (self.options.format is None and not self._transformer_family and any(True in d for d in dora)
                and all(len(d) == 1 for d in dora))  # peft: one DoRA setting per part

    def _attach_group(
        self, label: str, group: LoraGroupConfig, target: str, model: nn.Module,
        owner: Dict[str, str], seeded_from: Dict[str, set],
    ) -> List[nn.Parameter]:  # fmt: skip
        patterns = self._layer_patterns(label, group, target, model)
        hosts = lora_hosts(model, patterns, what=f"{label}.layers")
        self._patterns[label] = patterns
        if group.layers is None:
            log.info("%s: layers left out: the %s model family's default layers for the %s (%s) matched %d layer(s)",
                     label, self._kind, target, ", ".join(patterns), len(hosts))
        seed: LayerWeights = {}
        if group.init_from:
            seed = self._seed_layers(label, group, target, model)
            taken = set(seed) & {(target, n) for n in hosts}
            seeded_from.setdefault(self._resolve(group.init_from), set()).update(taken)
        params: List[nn.Parameter] = []
        for name, host in hosts.items():
            if name in owner:
                raise LayerSelectionError(
                    f"{label}.layers: layer '{name}' is already in {owner[name]}; "
                    "a layer carries one LoRA, so narrow one group's layers"
                )
            owner[name] = label
            if getattr(group, "svd_init", False) and host.weight.requires_grad and (target, name) not in seed:
                # svd_init rewrites the host weight; a fine-tune group exporting it would then save
                # the reduced weight instead of the trained one.
                raise UserError(
                    f"{label}: svd_init on layer '{name}', whose weight is also trained (a fine-tune group "
                    "selects it); drop svd_init for this group or leave the layer out of the fine-tune group"
                )
            if BRANCH_ATTR in host._modules:  # another adapter (LoRA / LyCORIS) put its branch here first
                raise LayerSelectionError(
                    f"{label}.layers: layer '{name}' already carries a branch of another adapter section "
                    "([[lora_*]] / [[lycoris_*]] select it too); a layer carries one adapter, so narrow one section's layers"
                )
            branch = self._make_branch(target, name, host, group, seed.get((target, name)))
            attach_branch(host, branch)
            self.layers[f"{target}.{name}"] = LoraLayer(target, name, label, host, branch)
            params += list(branch.parameters())
        return params

    def _layer_patterns(self, label: str, group: LoraGroupConfig, target: str, model: nn.Module) -> List[str]:
        """The group's ``layers``, or when it leaves them out the model family's default patterns
        for ``target`` (``context.default_layers``) that match a module of this model."""
        if group.layers is not None:
            return list(group.layers)
        how = "set layers = [...] (module names from named_modules() or 're:' patterns, see docs/lora.md)"
        defaults = getattr(self.context, "default_layers", None)
        patterns = [str(p) for p in (defaults(target) or ())] if defaults is not None else []
        if not patterns:
            raise UserError(f"{label}: layers is left out, but the {self._kind} model family has no default layers "
                            f"for the {target}; {how}")
        names = [name for name, _ in model_modules(model)]
        # A family's defaults cover its variants (SD3.5's attn2 is absent from SD3 medium): skip what is absent.
        used = [p for p in patterns if _matches_any(p, names)]
        if not used:
            raise UserError(f"{label}: layers is left out, but the {self._kind} model family's default layers for the "
                            f"{target} ({', '.join(patterns)}) match no module of the {type(model).__name__}; {how}")
        return used

    def _make_branch(
        self, target: str, name: str, host: nn.Module, group: LoraGroupConfig, seed: Optional[LoraWeights]
    ) -> LoraBranch:
        if seed is not None:  # continue from a file: its rank and alpha (and DoRA magnitude) win
            branch = self._seeded_branch(host, group, seed, f"{target}.{name}")
            with torch.no_grad():
                branch.down.weight.copy_(seed.down)
                branch.up.weight.copy_(seed.up)
        else:
            rank = rank_for(group.rank, host.weight.shape[0])
            if group.svd_init:
                rank = min(rank, max_svd_rank(host))
            kind = DoraBranch if group.dora else LoraBranch
            branch = kind(host, rank, group.alpha, group.dropout)
            if group.svd_init:
                svd_init(host, branch)
            else:
                branch.reset(self._generator(f"{target}.{name}"))
        branch.requires_grad_(True)  # the engine may have frozen the whole model before attach
        return branch

    def _seeded_branch(self, host: nn.Module, group: LoraGroupConfig, seed: LoraWeights, name: str) -> LoraBranch:
        """The branch a file's layer continues as: DoRA when the file's layer is DoRA, or when the
        group asks for it (its magnitude then starts as ``||W + dW||``: the file's model unchanged)."""
        if seed.magnitude is not None and seed.axis != "output":
            raise UserError(
                f"init_from: layer '{name}' normalises DoRA per input channel (LyCORIS wd_on_output = false); "
                "hcp trains DoRA per output channel, so it can merge this file (hcp generate --lora, merge-lora) "
                "but not continue training it"
            )
        if seed.magnitude is None and not group.dora:
            return LoraBranch(host, seed.rank, seed.alpha, group.dropout, cap=False)
        magnitude = seed.magnitude
        if magnitude is None:
            from .dora import channel_norm

            magnitude = channel_norm(host.weight.detach().float() + seed.delta().to(host.weight.device))
        return DoraBranch(host, seed.rank, seed.alpha, group.dropout, cap=False, magnitude=magnitude)

    def _generator(self, name: str) -> torch.Generator:
        # Per-layer seeds: a layer's start does not depend on which other layers were chosen.
        return torch.Generator().manual_seed((self.context.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)

    def _resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.context.base_dir, path))

    def _seed_layers(self, label: str, group: LoraGroupConfig, target: str, model: nn.Module) -> LayerWeights:
        """The layers of ``group``'s file that belong to ``target``, checked against the model."""
        path = self._resolve(group.init_from or "")
        if path not in self._files:
            try:
                self._files[path] = self._read_file(path)
            except UserError as exc:
                raise UserError(f"{label}.init_from: {exc}") from None
        lora = self._files[path]
        layers = self._match_file(lora, target, model)
        if not layers:
            raise UserError(
                f"{label}.init_from: {path} holds no LoRA weights for the {target} "
                f"(its layers: {', '.join(list(lora.weights)[:3])}, ...)"
            )
        return layers

    def _read_file(self, path: str) -> Any:
        """The file an ``init_from`` names (its ``weights`` by the file's own layer names)."""
        return read_lora_file(path)

    def _match_file(self, lora: Any, target: str, model: nn.Module) -> LayerWeights:
        """The layers of ``lora`` that belong to ``target``, by (part, native path)."""
        return match_layers(_only_target(lora, target, self._kind, model), {target: model}, self._kind)

    def _warn_unused(self, seeded_from: Mapping[str, set]) -> None:
        for path, used in seeded_from.items():
            unused = len(self._files[path].weights) - len(used)
            if unused:
                log.warning(
                    "%s: %d layer(s) of this LoRA file are in no group that seeds from it; they are not used",
                    path, unused,
                )

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """``<part>.<path>.lora_down.weight`` / ``.lora_up.weight`` (the branch's
        ``state_tensors``: DoRA adds ``.dora_scale``; svd_init its starting factors)."""
        state: Dict[str, torch.Tensor] = {}
        for key, layer in self.layers.items():
            b = layer.branch
            for suffix, tensor in b.state_tensors().items():
                state[f"{key}.{suffix}"] = tensor.detach()
            if getattr(b, "svd_down0", None) is not None:
                state[f"{key}.svd_down0"] = b.svd_down0
                state[f"{key}.svd_up0"] = b.svd_up0
        return state

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state`; a checkpoint from other LoRA settings is an error."""
        expected = self.trainable_state()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            parts = []
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)):
                if keys:
                    parts.append(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
            raise UserError(
                f"the checkpoint's {self.noun} does not match this pipeline's {self.noun} groups (" + "; ".join(parts) + ")"
            )
        with torch.no_grad():
            for key, layer in self.layers.items():
                b = layer.branch
                for suffix, tensor in b.state_tensors().items():
                    tensor.copy_(state[f"{key}.{suffix}"])
                if getattr(b, "svd_down0", None) is not None:
                    restore_svd_start(layer.host, b, state[f"{key}.svd_down0"], state[f"{key}.svd_up0"])

    # ------------------------------------------------------------------ export
    def export_layers(self, models: ModelBundle) -> List[ExportLayer]:
        """Every layer as a file would hold it (relative to the ORIGINAL base weights)."""
        out = []
        for layer in self.layers.values():
            down, up, alpha = export_factors(layer.branch)
            path = canonical_path(layer.target, models.part(layer.target), layer.name)
            magnitude = layer.branch.magnitude.detach().float() if isinstance(layer.branch, DoraBranch) else None
            out.append(ExportLayer(layer.target, path, LoraWeights(down, up, alpha, magnitude)))
        return out

    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        """Write ``lora.safetensors`` (``step`` None) or ``lora-<step>.safetensors`` into ``out_dir``."""
        layers = self.export_layers(models)
        path = os.path.join(out_dir, lora_file_name(step, self.context))
        meta = self.metadata(models, layers, step)
        opts = self.options
        write_lora_file(path, layers, fmt=self.file_format, kind=self._kind, metadata=meta, dtype=opts.save_dtype)
        if not self._dora_companion():
            return [path]
        kohya = os.path.join(out_dir, export_file_name(self.context, "lora", step, suffix=".kohya.safetensors"))
        write_lora_file(kohya, layers, fmt="kohya", kind=self._kind, metadata={**meta, "hcp_format": "kohya"},
                        dtype=opts.save_dtype)  # fmt: skip
        return [path, kohya]

    def metadata(self, models: ModelBundle, layers: Sequence[ExportLayer], step: Optional[int]) -> Dict[str, str]:
        """kohya's ``ss_*`` training facts plus hcp's own ``hcp_*`` notes (all strings)."""
        ctx = self.context
        ranks = Counter(l.weights.rank for l in layers)
        alphas = Counter(float(l.weights.alpha) for l in layers)
        steps = step if step is not None else ctx.extra.get("max_steps")
        te = getattr(models, "text_encoder", None)
        hidden = getattr(getattr(te, "config", None), "hidden_size", 768)
        base_version = BASE_MODEL_VERSIONS.get(self._kind) or ("sd_v2" if hidden == 1024 else "sd_v1")
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.most_common(1)[0][0]),
            "ss_network_alpha": _number(alphas.most_common(1)[0][0]),
            "ss_sd_model_name": os.path.basename(os.path.normpath(models.source)) if models.source else "",
            "ss_base_model_version": base_version,
            "ss_v2": str(base_version == "sd_v2"),
            # webui counts clip skip from 1 (= no skip); hcp's model.clip_skip counts from 0.
            "ss_clip_skip": str(ctx.clip_skip + 1),
            "ss_resolution": f"({ctx.resolution[0]}, {ctx.resolution[1]})" if ctx.resolution else "None",
            "ss_seed": str(ctx.seed),
            "hcp_clip_skip": str(ctx.clip_skip),
            "hcp_format": self.file_format,
            "hcp_family": self._kind,
            "hcp_groups": json.dumps(self._group_summary(), sort_keys=True),
        }
        if steps is not None:
            meta["ss_steps"] = str(steps)
        if "max_steps" in ctx.extra:
            meta["ss_max_train_steps"] = str(ctx.extra["max_steps"])
        dora = sum(isinstance(l.branch, DoraBranch) for l in self.layers.values())
        if dora:  # how LyCORIS (through kohya's sd-scripts) names a DoRA run
            meta["ss_network_module"] = "lycoris.kohya"
            meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
            meta["hcp_dora"] = f"{dora} layer(s) are DoRA: W' = dora_scale * (W + dW) / ||W + dW||, norm per output channel"
        svd_layers = [l for l in self.layers.values() if getattr(l.branch, "svd_down0", None) is not None]
        if svd_layers:
            meta["hcp_svd_init"] = (
                f"{len(svd_layers)} layer(s) used svd_init; each is stored relative to the original base weights "
                "as trained factors stacked with the negated starting factors, so its rank here is twice the "
                "configured rank (alpha doubled, scale unchanged)"
            )
        return meta

    def _group_summary(self) -> List[Dict[str, Any]]:
        out = []
        for target, groups in self.sections.items():
            for i, g in enumerate(groups):
                label = f"{self.section_names.get(target, target)}[{i}]"
                out.append({"section": label, **self._group_facts(g), "layers": self._patterns.get(label, list(g.layers or ()))})
        return out

    def _group_facts(self, group: Any) -> Dict[str, Any]:
        """What ``hcp_groups`` metadata records of one group besides its section and layers."""
        return {"rank": group.rank, "alpha": group.alpha, "svd_init": group.svd_init, "dora": group.dora}

    # ------------------------------------------------------------------ detach
    def detach(self) -> None:
        """Take every branch out of the model again (host weights as before :meth:`attach`)."""
        for layer in self.layers.values():
            detach_branch(layer.host)
        self.layers.clear()


def lora_hosts(model: nn.Module, patterns: Sequence[str], *, what: str) -> Dict[str, nn.Module]:
    """The layers ``patterns`` cover that can carry a LoRA: Linear, and Conv2d with groups=1.

    Grouped convolutions inside a selected container are left out; naming one is an error.
    """
    out: Dict[str, nn.Module] = {}
    for name, module in select_layers(model, patterns, what=what).items():
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            if name in patterns:
                raise LayerSelectionError(
                    f"{what}: layer '{name}' is a grouped convolution (groups={module.groups}); "
                    "LoRA works on nn.Linear and on nn.Conv2d with groups=1"
                )
            continue
        out[name] = module
    if not out:
        raise LayerSelectionError(f"{what}: the selected layers are all grouped convolutions, which LoRA cannot use")
    return out


def _matches_any(pattern: str, names: Sequence[str]) -> bool:
    """Whether a layer pattern (a name or ``re:`` regex) selects one of ``names``."""
    regex = compile_pattern(pattern)
    return any(regex.match(n) for n in names) if regex is not None else pattern in names


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _only_target(lora: LoraFile, target: str, kind: str, model: nn.Module) -> LoraFile:
    """The part of ``lora`` that belongs to model part ``target`` (``model``)."""
    reader = KOHYA_READERS.get(kind) if lora.layout == "kohya" else None
    if reader is not None:  # FLUX's kohya names are BFL's, fused layers included: read them as dotted names
        try:
            layers = reader(lora.weights, {target: model}, lora.path)
        except ValueError as exc:
            raise LoraFileError(str(exc)) from None
        keep = {k: v for k, v in layers.items() if k.startswith(target + ".")}  # other parts' names stay as read
        return LoraFile(lora.path, "peft", keep, lora.metadata)
    if lora.layout == "kohya":
        try:
            prefix = kohya_prefix(target, kind) + "_"
        except ValueError:  # kohya's SD layout has no names for this part (a transformer, T5)
            prefix = None
        keep = {k: v for k, v in lora.weights.items() if prefix and k.startswith(prefix)}
    else:
        keep = {k: v for k, v in lora.weights.items() if k.startswith(target + ".")}
    return LoraFile(lora.path, lora.layout, keep, lora.metadata)


def build_lora_adapter(
    sections: Mapping[str, Sequence[LoraGroupConfig]], *, context: AdapterContext, options: Any = None
) -> LoraAdapter:
    """The registered factory (see :class:`LoraAdapter`)."""
    return LoraAdapter(sections, context=context, options=options)
