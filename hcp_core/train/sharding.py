"""FSDP: the denoiser's trained weights, gradients and optimizer state split across processes.

Turned on by accelerate's own configuration (``distributed_type: FSDP`` in the file ``accelerate
launch --config_file`` reads, or ``--use_fsdp``), which reaches hcp as ``ACCELERATE_USE_FSDP`` and
``FSDP_*`` variables. hcp applies it with torch's ``fully_shard`` (FSDP2) itself, so that module
and parameter names, adapters and checkpoint files stay what they are without FSDP:

* Only the denoiser (UNet / transformer) is sharded, and in it only the *trained* tensors: each
  outermost block of a ``ModuleList`` (or each module of a class named in
  ``fsdp_transformer_layer_cls_to_wrap``) is one FSDP unit, the denoiser the root. Frozen weights
  stay whole on every process (FSDP's ``ignored_params``: they keep their half-precision storage,
  and FSDP wants one dtype per unit). That is what a full fine-tune of SDXL or FLUX needs:
  trained fp32 weights, their gradients and AdamW's two moments are ~16 bytes per parameter,
  divided by the number of processes. Text encoders and other adapters' tensors train replicated,
  their gradients averaged by :mod:`.grad_sync`.
* Checkpoints hold whole tensors (gathered, written by the main process), so a run saved with
  FSDP resumes without it, or on another number of processes, and the reverse.
* Exports read the weights inside :meth:`Sharding.in_cpu_memory`: each trained tensor gathered
  whole into the main process's CPU memory, one at a time. ``[sample]`` previews and validation
  run the denoiser inside :meth:`Sharding.gathered`: every process gathers the whole weights on
  its device and runs the denoiser locally; the main process writes.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch

from ..errors import UserError

log = logging.getLogger("hcp")

#: accelerate's switch for FSDP and the variables its launcher sets with it.
USE_FSDP = "ACCELERATE_USE_FSDP"
#: FSDP1 sharding strategies (by name or accelerate's number) -> FSDP2's reshard_after_forward.
_STRATEGIES = {"full_shard": True, "1": True, "shard_grad_op": False, "2": False}
#: Optimizers whose step works on FSDP's shards (element-wise updates), tested with it. Factored or
#: norm-based ones (Adafactor, Prodigy) need whole tensors; 8-bit ones hand raw pointers to kernels.
SHARD_SAFE_OPTIMIZERS = ("adamw", "sgd")
#: Variables hcp has no use for (it always saves whole tensors, wraps blocks itself).
_UNUSED = ("FSDP_STATE_DICT_TYPE", "FSDP_USE_ORIG_PARAMS", "FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING",
           "FSDP_BACKWARD_PREFETCH", "FSDP_FORWARD_PREFETCH", "FSDP_MIN_NUM_PARAMS", "FSDP_AUTO_WRAP_POLICY")


def _truthy(value: Optional[str]) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes")


@attrs.frozen
class FsdpSettings:
    """What accelerate's FSDP configuration asks of hcp."""

    #: Free a block's gathered weights after its forward (FULL_SHARD) or keep them to backward (SHARD_GRAD_OP).
    reshard_after_forward: bool = True
    #: Class names whose modules become FSDP units; empty: the denoiser's outermost blocks.
    wrap_classes: Tuple[str, ...] = ()
    version: str = "2"
    #: Settings in the launch that hcp has no use for (logged).
    unused: Tuple[str, ...] = ()


def fsdp_settings(environ: Mapping[str, str]) -> Optional[FsdpSettings]:
    """The FSDP settings of a launch's environment, or None without FSDP; configurations hcp
    cannot honour are a :class:`UserError` naming the setting and what to use instead."""
    if not _truthy(environ.get(USE_FSDP)):
        return None
    reshard = str(environ.get("FSDP_RESHARD_AFTER_FORWARD", "")).strip().lower()
    strategy = str(environ.get("FSDP_SHARDING_STRATEGY", "")).strip().lower()
    choice = reshard or strategy or "true"
    if choice in ("true", "false"):
        after_forward = choice == "true"
    elif choice in _STRATEGIES:
        after_forward = _STRATEGIES[choice]
    elif choice in ("no_shard", "3"):
        raise UserError("accelerate's FSDP config asks for NO_SHARD, which is plain data parallel: use distributed_type: "
                        "MULTI_GPU (hcp averages gradients in overlapped buckets)")
    else:
        raise UserError(f"accelerate's FSDP config: sharding '{choice}' is not supported by hcp (it shards within one "
                        "group of processes); use fsdp_reshard_after_forward: true (FULL_SHARD) or false (SHARD_GRAD_OP)")
    if _truthy(environ.get("FSDP_OFFLOAD_PARAMS")):
        raise UserError("accelerate's FSDP config sets fsdp_offload_params: true, which hcp does not support; set it to "
                        "false (frozen weights stay on the GPU; enable model.gradient_checkpointing to save memory)")
    if _truthy(environ.get("FSDP_ACTIVATION_CHECKPOINTING")):
        raise UserError("accelerate's FSDP config sets fsdp_activation_checkpointing: true; hcp checkpoints activations "
                        "through model.gradient_checkpointing = true instead: set that and turn the FSDP option off")
    classes = tuple(c.strip() for c in str(environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")).split(",") if c.strip())
    unused = tuple(key[len("FSDP_"):].lower() for key in _UNUSED if key in environ)
    return FsdpSettings(reshard_after_forward=after_forward, wrap_classes=classes,
                        version=str(environ.get("FSDP_VERSION", "2")), unused=unused)


@contextlib.contextmanager
def hidden_from_accelerate(environ: Dict[str, str]) -> Iterator[None]:
    """``ACCELERATE_USE_FSDP`` removed from ``environ`` for the duration: hcp shards the model
    itself; accelerate must build a plain data-parallel accelerator."""
    saved = environ.pop(USE_FSDP, None)
    try:
        yield
    finally:
        if saved is not None:
            environ[USE_FSDP] = saved


def check_compatible(pipeline: Any, precision: str) -> None:
    """Options that FSDP cannot run with, refused before the model loads."""
    if precision == "fp16":
        raise UserError("FSDP with mixed_precision = \"fp16\" is not supported (its gradient scaler does not unscale "
                        "sharded gradients); set mixed_precision = \"bf16\" (GPUs that support it) or \"no\"")
    if getattr(pipeline.model, "fp8_base", False):
        raise UserError("model.fp8_base with FSDP is not supported; set model.fp8_base = false")
    optimizer = pipeline.train.optimizer.name if pipeline.train.optimizer is not None else "adamw"
    if optimizer not in SHARD_SAFE_OPTIMIZERS:
        raise UserError(f"train.optimizer = \"{optimizer}\" does not work on FSDP's sharded tensors (its step needs "
                        f"whole tensors or raw memory); with FSDP use {' or '.join(SHARD_SAFE_OPTIMIZERS)}, or train "
                        "without FSDP")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        raise UserError(f"FSDP needs torch's fully_shard (torch 2.6 or newer); this is torch {torch.__version__}")


def fsdp_units(root: torch.nn.Module, trained: set, wrap_classes: Sequence[str] = ()) -> List[torch.nn.Module]:
    """The modules of ``root`` that become FSDP units (those holding a trained parameter): each
    module of a class in ``wrap_classes``, or else each entry of the outermost ``ModuleList``s."""
    def holds_trained(module: torch.nn.Module) -> bool:
        return any(id(p) in trained for p in module.parameters())

    units: List[torch.nn.Module] = []
    claimed: set = set()  # modules inside a unit already chosen
    for _, module in root.named_modules():
        if id(module) in claimed or module is root:
            continue
        if wrap_classes:
            chosen = [module] if type(module).__name__ in wrap_classes else []
        else:
            chosen = list(module) if isinstance(module, torch.nn.ModuleList) else []
        for unit in chosen:
            if holds_trained(unit):
                units.append(unit)
            claimed.update(id(m) for m in unit.modules())
        if chosen:
            claimed.update(id(m) for m in module.modules())
    return units


class Sharding:
    """The denoiser sharded with FSDP2 over every process, and what training needs around it."""

    def __init__(self, root: torch.nn.Module, units: List[torch.nn.Module], settings: FsdpSettings,
                 places: Sequence[Tuple[torch.nn.Module, str, Any]] = ()) -> None:
        self.root = root
        self.units = units  # FSDP modules, blocks first, the root last
        self.settings = settings
        self.places = list(places)  # (module, attribute, its sharded parameter) of every trained tensor

    @classmethod
    def shard(cls, root: torch.nn.Module, trained: Sequence[torch.nn.Parameter], settings: FsdpSettings,
              device: torch.device, world_size: int) -> Tuple["Sharding", Dict[int, torch.nn.Parameter]]:
        """Shard ``root``'s trained parameters; returns the sharding and ``{id(old parameter): new}``
        for every parameter ``fully_shard`` replaced (the old ones are emptied: anything still holding
        one must look the new one up)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        trained_ids = {id(p) for p in trained}
        where: Dict[int, Tuple[torch.nn.Module, str, torch.nn.Parameter]] = {}
        for module in root.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in trained_ids:
                    where[id(p)] = (module, name, p)
        frozen = {p for p in root.parameters() if id(p) not in trained_ids}
        mesh = init_device_mesh(device.type, (world_size,))
        # diffusers' FLUX blocks return views; FSDP warns at every step that an in-place op on one
        # would skip its backward hook. None follows in hcp's training step (a sharded FLUX
        # fine-tune equals the unsharded one, 1e-5), so the warning would only bury the log.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        blocks = fsdp_units(root, trained_ids, settings.wrap_classes)
        if settings.wrap_classes and not blocks:
            log.warning("FSDP: no module of class %s in the %s holds a trained tensor "
                        "(fsdp_transformer_layer_cls_to_wrap); everything is one unit, gathered whole at each "
                        "forward: check the class names (hcp layers MODEL lists them)",
                        ", ".join(settings.wrap_classes), original_class(type(root)).__name__)
        for unit in blocks:
            fully_shard(unit, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, ignored_params=frozen)
        # The root's own weights are needed again at once by backward: never freed after forward.
        fully_shard(root, mesh=mesh, reshard_after_forward=False, ignored_params=frozen)
        mapping: Dict[int, torch.nn.Parameter] = {}
        for key, (module, name, old) in where.items():
            new = getattr(module, name)
            if new is not old:
                mapping[key] = new
                old.data = torch.empty(0, dtype=old.dtype, device=old.device)  # free the whole copy
        log.info("FSDP (%s): %d trained tensors of the %s (%.1fM values) sharded over %d processes in %d units "
                 "(reshard after forward: %s); frozen weights stay whole on every process",
                 f"accelerate fsdp_version {settings.version}, applied as FSDP2", len(where),
                 original_class(type(root)).__name__,
                 sum(p.numel() for p in mapping.values()) / 1e6, world_size, len(blocks) + 1,
                 settings.reshard_after_forward)
        if settings.unused:
            log.info("FSDP: not used by hcp (it wraps blocks itself and saves whole tensors): fsdp_%s",
                     ", fsdp_".join(settings.unused))
        places = [(module, name, mapping[key]) for key, (module, name, _) in where.items() if key in mapping]
        return cls(root, [*blocks, root], settings, places), mapping

    @staticmethod
    def is_sharded(tensor: Any) -> bool:
        """Whether ``tensor`` is an FSDP shard (a DTensor)."""
        from torch.distributed.tensor import DTensor

        return isinstance(tensor, DTensor)

    @contextlib.contextmanager
    def gathered(self, write_back: bool = False) -> Iterator[None]:
        """Every process holds the denoiser's whole weights, as plain tensors in the modules, and
        runs it without communication (previews, validation, loading a checkpoint; exports read
        through :meth:`in_cpu_memory`). Call on every process.

        ``write_back``: what was written into the gathered weights (a checkpoint being loaded) is
        copied into each process's shard at the end; otherwise such writes are discarded.
        Do not call ``state_dict()`` / ``load_state_dict()`` on these modules inside: FSDP's hooks
        swap the shards back in (read and write parameters by attribute).
        """
        try:
            with torch.no_grad():
                for unit in self.units:
                    unit.set_reshard_after_forward(False, recurse=False)
                    unit.unshard()
            with self._original_classes():
                yield
        except BaseException:
            write_back = False
            raise
        finally:
            if write_back:
                self._write_back()
            # A forward cut short inside (a preview's out-of-memory, caught by the renderer) leaves FSDP
            # mid-forward on this process only, and reshard() would then keep that unit gathered: its next
            # all-gather would be skipped here alone. Reset first (where torch has it).
            # Only after a first forward initialised FSDP's state: before, nothing can be mid-forward.
            reset = getattr(self.root, "reset_iter_state", None)
            if reset is not None and getattr(self.root._get_fsdp_state(), "_is_root", None):
                reset()
            for unit in self.units:
                unit.reshard()
                unit.set_reshard_after_forward(self.settings.reshard_after_forward and unit is not self.root,
                                               recurse=False)

    @contextlib.contextmanager
    def in_cpu_memory(self, keep: bool) -> Iterator[None]:
        """Each trained tensor gathered whole, one at a time, into CPU memory and put in its
        module for the moment, on processes with ``keep`` (the others only take part in the
        gathering): for reading the weights (exports) without a whole copy on the GPU. Nothing may
        run the denoiser meanwhile. Call on every process."""
        placed: List[Tuple[torch.nn.Module, str, Any]] = []
        try:
            with torch.no_grad():
                for module, name, shard in self.places:
                    whole = self.full(shard, keep)
                    if keep:
                        module._parameters[name] = torch.nn.Parameter(whole, requires_grad=shard.requires_grad)
                        placed.append((module, name, shard))
            with self._original_classes():
                yield
        finally:
            for module, name, shard in placed:
                module._parameters[name] = shard

    @contextlib.contextmanager
    def _original_classes(self) -> Iterator[None]:
        """Each FSDP module shows its own class meanwhile (fully_shard made it "FSDP<class>"):
        exports write class names into config.json and model_index.json. Hooks stay on the instances."""
        fsdp_classes = [(unit, type(unit)) for unit in self.units]
        try:
            for unit, cls in fsdp_classes:
                unit.__class__ = original_class(cls)
            yield
        finally:
            for unit, cls in fsdp_classes:
                unit.__class__ = cls

    def _write_back(self) -> None:
        """Each gathered whole tensor (what the module holds while gathered) copied into this process's shard."""
        with torch.no_grad():
            for module, name, shard in self.places:
                local_slice(shard, getattr(module, name), into=True)

    def full(self, value: Any, keep: bool = True) -> Any:
        """``value`` (tensors, dicts, lists) with every shard replaced by the whole tensor, on the
        CPU. A collective: every process calls it with the same structure, one tensor gathered at a
        time; ``keep`` False (processes that write nothing) drops each gathered tensor at once
        (None in its place), so only the writing process ever holds the whole state."""
        if self.is_sharded(value):
            whole = value.full_tensor()
            return whole.cpu() if keep else None
        if isinstance(value, dict):
            return {k: self.full(v, keep) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.full(v, keep) for v in value)
        return value


def original_class(cls: type) -> type:
    """The class ``fully_shard`` derived ``cls`` from (``FSDPUNet2DConditionModel`` ->
    ``UNet2DConditionModel``)."""
    from torch.distributed.fsdp import FSDPModule

    if not issubclass(cls, FSDPModule):
        return cls
    return next((base for base in cls.__bases__ if not issubclass(base, FSDPModule)), cls)


def local_slice(like: Any, full: torch.Tensor, into: bool = False) -> Any:
    """This process's part of ``full`` laid out as the DTensor ``like``: a DTensor built from
    it, or, with ``into``, copied into ``like``'s local shard."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    part = full
    for dim, (start, length) in enumerate(zip(offset, shape)):
        part = part.narrow(dim, start, length)
    local = like.to_local()
    if into:
        local.copy_(part.to(local.dtype))
        return like
    return DTensor.from_local(part.to(device=local.device, dtype=full.dtype).contiguous(), like.device_mesh,
                              like.placements, run_check=False, shape=like.shape, stride=like.stride())


def shard_state(value: Any, like: Any) -> Any:
    """A loaded whole-tensor state (an optimizer moment, an EMA copy) made a shard like the
    parameter ``like`` when ``like`` is sharded and shapes agree; else ``value`` unchanged."""
    if Sharding.is_sharded(like) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(like.shape):
        return local_slice(like, value)
    return value


def shard_optimizer_state(state: Dict[str, Any], optimizer: Any) -> Dict[str, Any]:
    """An optimizer ``state_dict`` saved with whole tensors, each per-parameter tensor made a
    shard where the optimizer's parameter is one (``torch.optim`` numbers parameters in group order)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_param = {idx: {k: shard_state(v, params[int(idx)]) for k, v in entry.items()}
                 for idx, entry in state["state"].items()}
    return {**state, "state": per_param}
