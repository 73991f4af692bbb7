"""Everything a run needs before its first step, built once: :func:`build_run` -> :class:`Run`.

The loop (:mod:`hcp_core.train.loop`) only reads these parts. Components come from the
registry the pipeline was validated against (``pipeline.registry``), never a process-wide one.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import attrs
import torch

from ..config.pipeline import pipeline_to_dict
from ..config.schema import Pipeline, compile_options
from ..config.toml_write import dumps
from ..errors import UserError
from ..export_names import OUTPUT_NAME
from ..interfaces import AdapterContext, ModelBundle
from .compile import check_backend, setup_compile
from .ema import Ema
from .epochs import run_plan
from .grad_sync import grad_sync_for, refuse_sharded_engines
from .sharding import Sharding, check_compatible, fsdp_settings, hidden_from_accelerate
from .optim import build_optimizer, build_scheduler
from .packages import check_packages
from .progress import StepStats
from .run_folder import TEXT_CACHE_DIR, RunLock, open_run_folder
from .trackers import open_trackers

log = logging.getLogger("hcp")


@attrs.frozen
class Run:
    """The named, built parts of one training run."""

    pipeline: Pipeline
    accelerator: Any
    exp_dir: Path
    lock: Optional[RunLock]  # held by the main process only
    family: Any  # the ModelFamily (hook hcp_register_models): loading, prompts, the objective
    models: ModelBundle
    data: Any  # hcp_core.data.loader.TrainData
    adapters: List[Tuple[str, Any]]  # (component name, built adapter), in attach order
    trained_params: List[torch.nn.Parameter]
    train_text: bool  # whether any text-encoder weight trains (prompt encoding then keeps its graph)
    optimizer: Any
    lr_scheduler: Any
    prompt_encoder: Callable[..., Any]  # prompts -> conditioning (adapters may wrap it)
    loss_fn: Callable[..., torch.Tensor]
    ema: Optional[Ema]
    first_bucket: Tuple[int, int]  # (w, h) of the first dataset's first bucket: default sample size
    writer: Any = None  # the main process's trackers (hcp_core.train.trackers.Trackers), or None
    renderer: Any = None  # the [sample] renderer on the main process, or None
    validation: Any = None  # hcp_core.train.validation.Validation, or None without [validation]
    stats: StepStats = attrs.field(factory=StepStats)  # what the last optimizer step measured (loop.py)
    grad_sync: Any = None  # hcp_core.train.grad_sync.GradSync with several processes, else None
    compiled: Any = None  # hcp_core.train.compile.CompileWatch when model.compile is on, else None
    sharding: Optional[Sharding] = None  # the FSDP-sharded denoiser (accelerate's FSDP config), else None

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def gathered(self, write_back: bool = False) -> Any:
        """A context in which every module holds its whole weights (see
        :meth:`.sharding.Sharding.gathered`; nothing happens without FSDP). With FSDP, every process
        must enter it."""
        return self.sharding.gathered(write_back) if self.sharding is not None else contextlib.nullcontext()

    def weights_readable(self) -> Any:
        """A context in which the main process can read every trained tensor whole (exports):
        with FSDP gathered into its CPU memory (:meth:`.sharding.Sharding.in_cpu_memory`; every
        process must enter it), else nothing happens."""
        if self.sharding is None:
            return contextlib.nullcontext()
        return self.sharding.in_cpu_memory(keep=self.is_main)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """Every adapter's trained tensors, keyed ``<adapter>/<name>`` (what checkpoints hold);
        with FSDP the denoiser's are shards (:meth:`.sharding.Sharding.full` gathers them)."""
        out: Dict[str, torch.Tensor] = {}
        for name, adapter in self.adapters:
            out.update({f"{name}/{k}": v for k, v in adapter.trainable_state().items()})
        return out

    def close(self) -> None:
        """Stop data workers, close logs, release the run folder."""
        self.data.close()
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()
        if self.grad_sync is not None:
            self.grad_sync.close()
        if self.compiled is not None:
            self.compiled.close()


def setup_logging(exp_dir: Path, is_main: bool) -> None:
    """``train.log`` in the run folder plus the terminal, on the main process only."""
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if getattr(h, "_hcp", False):
            log.removeHandler(h)
            h.close()
    if not is_main:
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: List[logging.Handler] = [logging.FileHandler(exp_dir / "train.log"), logging.StreamHandler()]
    for h in handlers:
        h.setFormatter(fmt)
        h._hcp = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.propagate = False


def build_adapters(pipeline: Pipeline, context: AdapterContext) -> List[Tuple[str, Any]]:
    """Build each adapter that owns a section of the pipeline, in attach order."""
    owners = pipeline.registry.adapter_sections()
    by_component: Dict[str, Tuple[Any, Dict[str, List[Any]]]] = {}
    for section, configs in pipeline.adapters.items():
        comp, target = owners[section]
        entry = by_component.setdefault(comp.name, (comp, {}))
        entry[1].setdefault(target, []).extend(configs)
    built = []
    for name, (comp, targets) in by_component.items():
        kwargs = {"options": pipeline.adapter_options[comp.options[0]]} if comp.options else {}
        built.append((name, comp.build(targets, context=context, **kwargs)))
    # Adapters that select layers by their original names (fine-tuning) attach before wrappers (LoRA).
    return sorted(built, key=lambda item: getattr(item[1], "attach_order", 0))


def make_accelerator(pipeline: Pipeline) -> Any:
    """A fresh accelerate ``Accelerator`` for this pipeline's precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one global state per process; a library user running a second pipeline
    # (say, with other mixed precision) needs a fresh one. The process group of a distributed
    # launch lives in PartialState, which stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    refuse_sharded_engines(os.environ)  # DeepSpeed / Megatron configs: refused (grad_sync.py says why)
    from .precision import machine_precision

    precision, why = machine_precision(pipeline.model.mixed_precision)
    if fsdp_settings(os.environ) is not None:  # unsupported FSDP settings fail here, before anything loads
        check_compatible(pipeline, precision)
    with hidden_from_accelerate(os.environ):  # hcp shards the denoiser itself (sharding.py)
        accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    refuse_sharded_engines({}, str(accelerator.distributed_type.value))  # however accelerate was told
    accelerator.precision_reason = why  # logged once the run's log exists
    return accelerator


def agreed(accelerator: Any, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, with every process learning whether it failed anywhere (a collective:
    every process calls it, ``fn`` may do nothing on some): the process that failed raises its
    own error, the others a :class:`UserError` saying ``what`` went wrong elsewhere, so none waits
    at its next collective for a process that has exited."""
    result, failure = None, None
    try:
        result = fn()
    except BaseException as exc:  # other processes must not wait forever for one that failed
        failure = exc
    if accelerator.num_processes > 1:
        flag = torch.tensor([1 if failure is not None else 0], device=accelerator.device)
        if int(accelerator.reduce(flag, "max").item()) and failure is None:
            raise UserError(f"{what} (see its message); this process stops too")
    if failure is not None:
        raise failure
    return result


def open_folder(pipeline: Pipeline, accelerator: Any, *, resume: bool, overwrite: bool) -> Tuple[Path, Optional[RunLock]]:
    """The run folder made ready and locked by the main process; other ranks wait for it."""
    exp_dir = Path(pipeline.base_dir) / pipeline.exp_dir
    lock = agreed(accelerator, f"exp_dir {exp_dir}: the main process could not open the run folder",
                  lambda: open_run_folder(exp_dir, resume=resume, overwrite=overwrite)
                  if accelerator.is_main_process else None)
    setup_logging(exp_dir, accelerator.is_main_process)
    for note in lock.notes if lock is not None else ():
        log.warning("%s", note)
    log.info("mixed precision: %s", getattr(accelerator, "precision_reason", accelerator.mixed_precision))
    return exp_dir, lock


def build_run(pipeline: Pipeline, *, resume: bool = False, overwrite: bool = False) -> Run:
    """Open the run folder, load the model and data, attach adapters, build the optimizer.

    ``resume`` says the folder is expected to hold this run; ``overwrite`` moves an older run aside.
    """
    from accelerate.utils import set_seed

    acc = make_accelerator(pipeline)
    compiling = compile_options(pipeline.model.compile)
    if compiling is not None:  # refused before the model loads, not in step 1
        check_backend(compiling, acc.device)
    exp_dir, lock = open_folder(pipeline, acc, resume=resume, overwrite=overwrite)
    try:
        from .precision import apply_tf32

        tf32 = apply_tf32(pipeline.model.allow_tf32, cuda=acc.device.type == "cuda")
        if tf32:
            log.info("%s", tf32)
        set_seed(pipeline.seed)
        return _build_parts(pipeline, acc, exp_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def size_multiple(family: Any, models: ModelBundle) -> int:
    """What bucket sides must be multiples of: the family's ``size_multiple`` (optional member), or
    its latent factor."""
    multiple = getattr(family, "size_multiple", None)
    return int(multiple(models)) if multiple is not None else int(family.latent_factor(models))


def check_parts(pipeline: Pipeline, family: Any) -> None:
    """Every adapter section targets a part the family has (``[[lora_unet]]`` on FLUX is an error)."""
    owners = pipeline.registry.adapter_sections()
    parts = tuple(getattr(family, "parts", ()))
    wrong = [s for s in pipeline.adapters if parts and owners[s][1] not in parts]
    if wrong:
        usable = sorted(s for s, (_, target) in owners.items() if target in parts)
        raise UserError(f"{', '.join(f'[[{s}]]' for s in wrong)}: the {pipeline.model.family.name} model has no "
                        f"'{owners[wrong[0]][1]}'; its parts are {', '.join(parts)} (sections: {', '.join(usable)})")


def model_family(pipeline: Pipeline) -> Any:
    """The pipeline's built model family; a model path that did not exist at validation is named."""
    from ..models.loading import ModelLoadError, missing_model_message

    if pipeline.model.family is None:
        raise ModelLoadError(missing_model_message(pipeline.model.pretrained))
    family = pipeline.model.family.build()
    check = getattr(family, "check_options", None)  # optional member: options this family cannot honour
    if check is not None:
        check(pipeline)
    return family


def _build_parts(pipeline: Pipeline, acc: Any, exp_dir: Path, lock: Optional[RunLock]) -> Run:
    from ..data.loader import build_train_data
    from .validation import Validation, prepare_validation
    from ..data.size_checks import native_size

    p, cfg = pipeline, pipeline.train
    check_packages(p)  # a missing optional package (optimizer, tracker) fails before the model loads
    if acc.is_main_process:
        (exp_dir / "config.toml").write_text(dumps(pipeline_to_dict(p)))
    family = model_family(p)
    models: ModelBundle = family.load(p.model.pretrained, prediction_type=p.model.prediction_type, config=p.model.config)
    factor, multiple = family.latent_factor(models), size_multiple(family, models)
    data = build_train_data(p, registry=p.registry, rank=acc.process_index, world_size=acc.num_processes,
                            latent_factor=factor, size_multiple=multiple, verify_images=True,
                            native_size=native_size(models, factor),
                            # pinned batches copy to the GPU asynchronously
                            pin_memory=acc.device.type == "cuda", cuda=acc.device.type == "cuda",
                            # torchrun and accelerate launch say how many processes share this machine
                            local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    first_bucket = tuple(next(iter(data.prepared.values())).bucket_sizes[0])
    total_steps = run_plan(p, data).total_steps  # train.max_steps, or what train.epochs comes to
    val_data = prepare_validation(p, latent_factor=factor, size_multiple=multiple)
    context = AdapterContext(exp_dir=str(exp_dir), base_dir=p.base_dir, clip_skip=p.model.clip_skip,
                             resolution=first_bucket, seed=p.seed,
                             extra={"max_steps": total_steps, OUTPUT_NAME: p.output_name},
                             default_layers=getattr(family, "default_layers", None))
    check_parts(p, family)
    adapters = build_adapters(p, context)
    groups: List[Dict[str, Any]] = []
    for _, adapter in adapters:
        groups.extend(adapter.attach(models))
    groups = [g for g in groups if g["params"]]
    if not groups:
        sections = ", ".join(f"[[{s}]]" for s in sorted(p.registry.adapter_sections())) or "none registered"
        raise UserError(f"nothing to train: add at least one adapter section ({sections}) with layers/words that exist")
    trained = [prm for g in groups for prm in g["params"]]
    text_encoders = [m for name, m in models.modules().items() if name.startswith("text_encoder")]
    train_text = any(prm.requires_grad for te in text_encoders for prm in te.parameters())
    vae_check = getattr(family, "vae_safe_in_bf16", None)  # optional family member
    place_models(models, acc.device, p.model, acc.mixed_precision,
                 vae_bf16_safe=bool(vae_check is not None and vae_check(models)))
    data.cache_latents(models.vae, device=acc.device, rank=acc.process_index, world_size=acc.num_processes,
                       wait=acc.wait_for_everyone)
    sharding, groups, trained = shard_denoiser(models, adapters, groups, trained, acc)
    # Models are not wrapped in DDP: gradients of the trained tensors are averaged across processes
    # in buckets reduced during backward (grad_sync.py), which keeps module names and frees
    # adapters to train any tensor (embeddings, LoRA, layers) without DDP's unused-parameter rules.
    grad_sync = grad_sync_for(acc, [prm for prm in trained if not Sharding.is_sharded(prm)])  # FSDP reduces its own
    optimizer = acc.prepare(build_optimizer(groups, cfg.optimizer))  # FSDP: adamw/sgd only (check_compatible)
    compiled = setup_compile(models, compile_options(p.model.compile), optimizer)
    lr_scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
    prompt_encoder = family.prompt_encoder(models, clip_skip=p.model.clip_skip)
    for _, adapter in adapters:  # e.g. prompt tuning expands custom words into their tokens
        wrap = getattr(adapter, "wrap_prompt_encoder", None)
        if wrap is not None:
            prompt_encoder = wrap(prompt_encoder)
    if p.model.prompt_emphasis:  # after wrapping: the custom-word encoders read emphasis too
        from ..models.emphasis import enable_emphasis

        prompt_encoder = enable_emphasis(prompt_encoder)
    if p.model.cache_text:
        prompt_encoder = cached_text(p, family, models, data, prompt_encoder, validation=val_data, wrapped=any(
            getattr(a, "wrap_prompt_encoder", None) for _, a in adapters), train_text=train_text, device=acc.device,
            autocast=acc.autocast, root=str(exp_dir / TEXT_CACHE_DIR), precision=str(acc.mixed_precision),
            write=acc.is_main_process)
    writer = open_trackers(p, exp_dir) if acc.is_main_process else None
    run = Run(
        pipeline=p, accelerator=acc, exp_dir=exp_dir, lock=lock, family=family, models=models, data=data, adapters=adapters,
        trained_params=trained, train_text=train_text, optimizer=optimizer, lr_scheduler=lr_scheduler,
        prompt_encoder=prompt_encoder, loss_fn=p.train.loss.build(),
        ema=Ema(trained, cfg.ema.decay) if cfg.ema.enabled else None, first_bucket=first_bucket, writer=writer,
    )  # fmt: skip
    validation = Validation.build(p, val_data, latent_factor=factor) if val_data else None
    return attrs.evolve(run, renderer=build_renderer(run), validation=validation, grad_sync=grad_sync,
                        compiled=compiled, sharding=sharding)


def refuse_stale_adapters(adapters: List[Tuple[str, Any]]) -> None:
    """A :class:`UserError` naming an adapter whose trained tensors are empty after sharding: it
    kept the parameter objects FSDP replaced, and would save and export empty tensors."""
    for name, adapter in adapters:
        stale = [key for key, value in adapter.trainable_state().items()
                 if not Sharding.is_sharded(value) and value.numel() == 0]
        if stale:
            raise UserError(f"adapter '{name}' cannot train under FSDP: it keeps parameter objects that FSDP replaced "
                            f"(its '{stale[0]}' is now empty); it must read its tensors through their modules "
                            "(CONTRIBUTING.md, Adapters). Train without FSDP (distributed_type: MULTI_GPU)")


def shard_denoiser(models: ModelBundle, adapters: List[Tuple[str, Any]], groups: List[Dict[str, Any]],
                   trained: List[torch.nn.Parameter],
                   acc: Any) -> Tuple[Optional[Sharding], List[Dict[str, Any]], List[torch.nn.Parameter]]:
    """With accelerate's FSDP config and several processes: the denoiser's trained tensors sharded
    (:mod:`.sharding`), and the optimizer's groups and the trained list pointing at the shards."""
    settings = fsdp_settings(os.environ)
    if settings is None:
        return None, groups, trained
    if acc.num_processes == 1:
        log.info("FSDP is configured but only one process runs: nothing to shard")
        return None, groups, trained
    inside = {id(prm) for prm in models.denoiser.parameters()}
    if not any(id(prm) in inside for prm in trained):
        log.warning("FSDP is configured but the denoiser trains no tensor of its own; training data-parallel")
        return None, groups, trained
    sharding, new = Sharding.shard(models.denoiser, [prm for prm in trained if id(prm) in inside], settings,
                                   acc.device, acc.num_processes)
    refuse_stale_adapters(adapters)
    groups = [{**g, "params": [new.get(id(prm), prm) for prm in g["params"]]} for g in groups]
    return sharding, groups, [new.get(id(prm), prm) for prm in trained]


def cached_text(p: Pipeline, family: Any, models: ModelBundle, data: Any, encoder: Any, *, wrapped: bool,
                train_text: bool, device: Any, validation: Any = None, autocast: Any = None,
                root: Optional[str] = None, precision: str = "no", write: bool = True) -> Any:
    """The prompt encoder replaced by one that serves outputs computed once (``model.cache_text``)."""
    from ..config.values import fill_placeholders
    from .text_cache import cache_text

    if not getattr(family, "text_cache", False):
        raise UserError(f"model.cache_text: the {p.model.family.name} family does not support caching text-encoder "
                        "outputs (its prompt encodings vary in length); set cache_text = false")
    if train_text or wrapped:
        raise UserError("model.cache_text needs frozen text encoders and plain prompts, but this run trains a text "
                        "encoder or custom words; set cache_text = false")
    extra = [] if p.sample is None else [*(fill_placeholders(x, p.sample.word_names) for x in p.sample.prompts),
                                         p.sample.negative_prompt]
    held = {f"validation.{name}": prep for name, prep in (validation or {}).items()}  # their prompts too
    return cache_text(encoder, models, {**data.prepared, **held}, extra, device=device, autocast=autocast,
                      root=root, precision=precision, write=write)


def place_models(models: ModelBundle, device: Any, model_cfg: Any, precision: str, *, vae_bf16_safe: bool = False) -> None:
    """Move every part to ``device``; frozen weights go to the mixed precision's half type (trained
    ones stay fp32): autocast would cast each of them to it in every forward anyway (on a CPU too,
    where only bf16 is allowed). ``vae_bf16_safe``: the family says its VAE may go bf16 under
    ``model.vae_dtype = "auto"``."""
    from .precision import choose_vae_dtype, torch_dtype

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    vae_name, why = choose_vae_dtype(model_cfg.vae_dtype, model_cfg.vae_fp32, precision, bf16_safe=vae_bf16_safe,
                                     cuda=device.type == "cuda")
    log.info("VAE weights: %s (%s)", vae_name, why)
    trains = {}
    for name, module in models.modules().items():
        trains[name] = any(prm.requires_grad for prm in module.parameters())
        module.to(device)
        module.train(trains[name])
        # T5 overflows in fp16 (its feed-forward activations exceed 65504): it stays fp32 there.
        t5_in_fp16 = half is torch.float16 and type(module).__name__.startswith("T5")
        dtype = torch_dtype(vae_name) if name == "vae" else half
        if dtype is not None and not t5_in_fp16:
            for prm in module.parameters():
                if not prm.requires_grad:
                    prm.data = prm.data.to(dtype)
    if getattr(model_cfg, "fp8_base", False):  # frozen denoiser weights in 8 bits, upcast per forward
        from ..models.fp8_storage import store_linears_in_fp8

        store_linears_in_fp8(models.denoiser)
    if model_cfg.gradient_checkpointing:
        for name in ("unet", "transformer"):
            if trains.get(name):
                getattr(models, name).enable_gradient_checkpointing()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            te = getattr(models, name)
            if te is not None and trains.get(name) and hasattr(te, "gradient_checkpointing_enable"):
                te.gradient_checkpointing_enable()


def build_renderer(run: Run) -> Any:
    """The ``[sample]`` image renderer on the main process; None without ``[sample]``."""
    from .sample_images import SampleRenderer

    p = run.pipeline
    if p.sample is None or not run.is_main:
        return None
    return SampleRenderer(
        p.sample, models=run.models, prompt_encoder=run.prompt_encoder, exp_dir=run.exp_dir,
        default_size=run.first_bucket, model_path=str((Path(p.base_dir) / p.model.pretrained).resolve()),
        clip_skip=p.model.clip_skip, prediction_type=p.model.prediction_type,
        autocast=run.accelerator.autocast, writer=run.writer, render=run.family.render,
        optimizer=run.optimizer,
    )  # fmt: skip
