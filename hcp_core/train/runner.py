"""``hcp run``: one readable training loop on accelerate.

Each optimizer step draws ``gradient_accumulation`` micro-batches from *every* dataset; a
dataset's loss is weighted by its ``loss_weight``. Only the main process writes files.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import attrs
import torch

from ..config.pipeline import pipeline_to_dict
from ..config.schema import Pipeline
from ..config.toml_write import dumps
from ..errors import UserError
from ..interfaces import AdapterContext, LossInputs, ModelBundle
from ..models.sdxl import unet_conditioning
from ..plugins import get_registry
from . import checkpoint as ckpt
from .diffusion import draw_noise_and_timesteps, min_snr_weights, sample_seed, snr, training_target
from .ema import Ema
from .optim import build_optimizer, build_scheduler
from .progress import Progress
from .sampling import build_sampler

log = logging.getLogger("hcp")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@attrs.frozen
class RunResult:
    """What a finished run left behind."""

    exp_dir: str
    step: int
    exports: List[str]
    last_loss: float


def _setup_logging(exp_dir: Path, is_main: bool) -> None:
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


def build_adapters(pipeline: Pipeline, context: AdapterContext) -> List[tuple[str, Any]]:
    """Build each adapter that owns a section of the pipeline, in attach order."""
    registry = get_registry()
    owners = registry.adapter_sections()
    by_component: Dict[str, tuple[Any, Dict[str, List[Any]]]] = {}
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


class Trainer:
    """Holds the state of one run; :func:`run` is the entry point."""

    def __init__(self, pipeline: Pipeline) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        # accelerate keeps one global state per process; a library user running a second
        # pipeline (say, with other mixed precision) needs a fresh one. The process group of a
        # distributed launch lives in PartialState, which stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.p = pipeline
        self.cfg = pipeline.train
        self.accelerator = Accelerator(
            mixed_precision=pipeline.model.mixed_precision,
            cpu=not torch.cuda.is_available(),
        )
        self.is_main = self.accelerator.is_main_process
        self.exp_dir = Path(pipeline.exp_dir)
        if self.is_main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        _setup_logging(self.exp_dir, self.is_main)
        self.step = 0
        self.writer = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from ..models.loading import load_models
        from ..models.sdxl import make_prompt_encoder
        from ..data.loader import build_train_data

        p = self.p
        set_seed(p.seed)
        if self.is_main:
            (self.exp_dir / "config.toml").write_text(dumps(pipeline_to_dict(p)))
        self.models: ModelBundle = load_models(p.model.pretrained, prediction_type=p.model.prediction_type,
                                                  config=p.model.config)
        acc = self.accelerator
        self.data = build_train_data(p, rank=acc.process_index, world_size=acc.num_processes,
                                     latent_factor=_latent_factor(self.models.vae))
        first = next(iter(self.data.prepared.values()))
        context = AdapterContext(
            exp_dir=str(self.exp_dir), base_dir=p.base_dir, clip_skip=p.model.clip_skip,
            resolution=tuple(first.bucket_sizes[0]), seed=p.seed, extra={"max_steps": self.cfg.max_steps},
        )
        self.adapters = build_adapters(p, context)
        groups: List[Dict[str, Any]] = []
        for _, adapter in self.adapters:
            groups.extend(adapter.attach(self.models))
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise UserError(
                "nothing to train: add at least one of [[lora_unet]], [[lora_text_encoder]], [[unet]], "
                "[[text_encoder]] or [tokenizer_pt] with layers/words that exist"
            )
        self.trained_params = [prm for g in groups for prm in g["params"]]
        m = self.models
        self.train_unet = any(prm.requires_grad for prm in m.unet.parameters())
        self.train_te = any(prm.requires_grad for te in (m.text_encoder, m.text_encoder_2) if te is not None
                            for prm in te.parameters())
        self._place_models()
        self.data.cache_latents(self.models.vae, device=acc.device, rank=acc.process_index,
                                world_size=acc.num_processes, wait=acc.wait_for_everyone)
        self.optimizer = build_optimizer(groups, self.cfg.optimizer)
        self.lr_scheduler = build_scheduler(self.optimizer, self.cfg.scheduler, self.cfg.max_steps)
        # Models are not wrapped in DDP: gradients of the trained tensors are averaged across
        # processes in one flat all-reduce per step (_sync_grads), which keeps adapters free to
        # train any tensor (embeddings, LoRA, layers) without DDP's unused-parameter rules.
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.unet, self.text_encoder = m.unet, m.text_encoder
        self.prompt_encoder = make_prompt_encoder(m, clip_skip=p.model.clip_skip)  # SDXL: both encoders
        for _, adapter in self.adapters:  # e.g. prompt tuning expands custom words into their tokens
            wrap = getattr(adapter, "wrap_prompt_encoder", None)
            if wrap is not None:
                self.prompt_encoder = wrap(self.prompt_encoder)
        self.ema = Ema(self.trained_params, self.cfg.ema.decay) if self.cfg.ema.enabled else None
        spec = self.cfg.loss
        self.loss_fn = spec.build() if spec is not None else _builtin_loss("mse")
        # Batches with attention masks switch plain MSE to its masked form; other losses get the map as is.
        self.masked_loss_fn = _builtin_loss("masked_mse") if spec is None or spec.name == "mse" else self.loss_fn
        if self.is_main:
            self._open_tensorboard()
        self.sampler = build_sampler(self)  # None without [sample] and off the main process

    def _place_models(self) -> None:
        m, dev = self.models, self.accelerator.device
        mp = self.p.model.mixed_precision
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp) if dev.type == "cuda" else None
        parts = (("unet", m.unet), ("text_encoder", m.text_encoder), ("text_encoder_2", m.text_encoder_2), ("vae", m.vae))
        for name, module in ((n, mod) for n, mod in parts if mod is not None):
            trained = any(prm.requires_grad for prm in module.parameters())
            module.to(dev)
            module.train(trained)
            if half is not None and not (name == "vae" and self.p.model.vae_fp32):
                # Frozen weights in half precision save memory; trained ones stay fp32.
                for prm in module.parameters():
                    if not prm.requires_grad:
                        prm.data = prm.data.to(half)
        if self.p.model.gradient_checkpointing:
            if self.train_unet:
                m.unet.enable_gradient_checkpointing()
            for te in (m.text_encoder, m.text_encoder_2):
                if te is not None and self.train_te and hasattr(te, "gradient_checkpointing_enable"):
                    te.gradient_checkpointing_enable()

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            return
        self.writer = SummaryWriter(str(self.exp_dir / "logs"))

    # ------------------------------------------------------------------ state
    def _trainable(self) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for name, adapter in self.adapters:
            out.update({f"{name}/{k}": v for k, v in adapter.trainable_state().items()})
        return out

    def save(self, data_state: Dict[str, Any]) -> None:
        """Checkpoint (all ranks wait) and export user-facing files; main process writes."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.lr_scheduler.state_dict(),
                "rng": ckpt.rng_state(),
                "data": data_state,
                "ema": self.ema.state_dict() if self.ema else {},
            }
            path = ckpt.save_checkpoint(self.exp_dir, self.step, trainable=self._trainable(), training_state=state,
                                        meta={"max_steps": self.cfg.max_steps}, keep=self.cfg.keep_checkpoints)
            self.export(self.step)
            log.info("saved checkpoint %s", path)
        self.accelerator.wait_for_everyone()

    def export(self, step: Optional[int]) -> List[str]:
        if self.ema is not None and step is None:
            with self.ema.swapped_in():
                return self._export_all(step)
        return self._export_all(step)

    def _export_all(self, step: Optional[int]) -> List[str]:
        paths: List[str] = []
        for _, adapter in self.adapters:
            paths.extend(adapter.export(self.models, str(self.exp_dir), step))
        return paths

    def resume(self, where: str) -> None:
        path = ckpt.resolve_resume(self.exp_dir, where)
        trainable, state, meta = ckpt.load_checkpoint(path)
        for name, adapter in self.adapters:
            prefix = f"{name}/"
            adapter.load_trainable_state({k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)})
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop
    def latents_of(self, batch: Dict[str, Any], sample_ids: List[int]) -> torch.Tensor:
        """Scaled VAE latents of a batch: cached ones, or encoded now (sampled per sample)."""
        dev = self.accelerator.device
        if "latents" in batch:
            return batch["latents"].to(dev)
        vae = self.models.vae
        with torch.no_grad():
            pixels = batch["pixel_values"].to(dev, dtype=vae.dtype)
            dist = vae.encode(pixels).latent_dist
            eps = torch.stack([
                torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
                    sample_seed(self.p.seed, self.step, sid, stream=1)))
                for sid in sample_ids
            ]).to(dev)
            z = dist.mean.float() + dist.std.float() * eps
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:
                z = z - shift
            return z * vae.config.scaling_factor

    def micro_step_loss(self, batches: Dict[str, Dict[str, Any]]) -> tuple[torch.Tensor, float]:
        """Weighted sum over datasets of the per-dataset mean loss for one micro-step."""
        total = None
        scheduler = self.models.scheduler
        for ordinal, batch in enumerate(batches.values()):
            # Sample ids are stable across batch layouts and process counts (see diffusion.py).
            ids = [ordinal * 1_000_000_000 + int(i) for i in batch["indices"]]
            latents = self.latents_of(batch, ids)
            noise, t = draw_noise_and_timesteps(
                latents, ids, seed=self.p.seed, step=self.step,
                num_train_timesteps=scheduler.config.num_train_timesteps, noise_offset=self.cfg.noise_offset,
            )
            noisy = scheduler.add_noise(latents, noise, t)
            with torch.set_grad_enabled(self.train_te), self.accelerator.autocast():
                cond = unet_conditioning(self.prompt_encoder, batch, noisy.device)  # SDXL adds pooled + time ids
            with self.accelerator.autocast():
                pred = self.unet(noisy, t, **cond).sample
            target = training_target(scheduler, latents, noise, t, self.models.prediction_type)
            weight_map = batch.get("weight_map")
            snr_values = snr(scheduler, t)
            loss_fn = self.masked_loss_fn if weight_map is not None else self.loss_fn
            per_sample = loss_fn(pred.float(), target.float(), LossInputs(
                timesteps=t, weight_map=None if weight_map is None else weight_map.to(pred.device), snr=snr_values))
            w = min_snr_weights(snr_values, self.cfg.min_snr_gamma, self.models.prediction_type)
            if w is not None:
                per_sample = per_sample * w
            term = per_sample.mean() * batch["loss_weight"]
            total = term if total is None else total + term
        assert total is not None
        return total, float(total.detach())

    def train(self) -> RunResult:
        acc, cfg = self.accelerator, self.cfg
        progress = Progress(cfg.max_steps, self.step, cfg.log_every, enabled=self.is_main)
        last_loss = float("nan")
        last_saved = self.step
        try:
            while self.step < cfg.max_steps:
                data_state = self.data.state_dict()
                try:
                    step_loss = 0.0
                    for micro in range(cfg.gradient_accumulation):
                        batches = self.data.next_batches()
                        loss, value = self._guarded_loss(batches)
                        step_loss += value / cfg.gradient_accumulation
                        if loss.requires_grad:  # e.g. no prompt held a trained word this micro-step
                            acc.backward(loss / cfg.gradient_accumulation)
                    self._sync_grads()
                    if cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.trained_params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                except KeyboardInterrupt:
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.step > last_saved:
                        log.info("interrupted: saving a checkpoint at step %d before exiting", self.step)
                        self.save(data_state)
                    raise
                if self.ema is not None:
                    self.ema.update()
                self.step += 1
                last_loss = step_loss
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(self.step, step_loss, lr)
                if self.writer is not None:
                    self.writer.add_scalar("loss", step_loss, self.step)
                    for g in self.optimizer.param_groups:
                        self.writer.add_scalar(f"lr/{g.get('name', 'group')}", g["lr"], self.step)
                if self.sampler is not None and self.sampler.due(self.step, cfg.max_steps):
                    self.sampler.sample(self.step)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save(self.data.state_dict())
                    last_saved = self.step
        finally:
            progress.close()
        self.data.close()
        if self.step > last_saved or last_saved == 0:
            self.save(self.data.state_dict())
        self._check_ranks_agree()
        exports: List[str] = []
        if self.is_main:
            exports = self.export(None)
            if self.sampler is not None:  # with the exported weights (EMA swapped in, if any)
                with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
                    self.sampler.sample(self.step)
            if self.writer is not None:
                self.writer.close()
            log.info("done: %d steps, exports: %s", self.step, ", ".join(exports) or "none")
        acc.wait_for_everyone()
        return RunResult(exp_dir=str(self.exp_dir), step=self.step, exports=exports, last_loss=last_loss)

    def _sync_grads(self) -> None:
        """Average the trained tensors' gradients over processes (what DDP would do)."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        params = self.trained_params
        for prm in params:  # a tensor unused on this rank (a word absent from its prompts) still joins
            if prm.grad is None:
                prm.grad = torch.zeros_like(prm)
        flat = torch.cat([prm.grad.reshape(-1).float() for prm in params])
        dist.all_reduce(flat)
        flat /= self.accelerator.num_processes
        offset = 0
        for prm in params:
            n = prm.grad.numel()
            prm.grad.copy_(flat[offset:offset + n].view_as(prm.grad))
            offset += n

    def _check_ranks_agree(self) -> None:
        """Every process must end with bit-identical trained weights; say so or fail loudly."""
        n = self.accelerator.num_processes
        if n == 1:
            return
        import hashlib

        digest = hashlib.sha256()
        for prm in self.trained_params:
            digest.update(prm.detach().float().cpu().numpy().tobytes())
        words = torch.tensor(list(digest.digest()[:16]), dtype=torch.int64, device=self.accelerator.device)
        gathered = self.accelerator.gather(words.reshape(1, -1)).reshape(n, -1)
        if not all(torch.equal(gathered[0], row) for row in gathered):
            raise RuntimeError("processes ended with different trained weights; gradients were not synchronised")
        log.info("all %d processes hold identical trained weights (sha256 %s...)", n, digest.hexdigest()[:12])

    def _guarded_loss(self, batches: Dict[str, Dict[str, Any]]) -> tuple[torch.Tensor, float]:
        try:
            loss, value = self.micro_step_loss(batches)
        except torch.OutOfMemoryError:
            sizes = ", ".join(f"data.{name}: batch {len(b['indices'])} at {b['target_size_hw'][0][1]}x{b['target_size_hw'][0][0]}"
                              for name, b in batches.items())
            raise UserError(f"out of memory at step {self.step + 1} ({sizes}); lower batch_size or the resolution, "
                            "or enable model.gradient_checkpointing / mixed precision") from None
        if self.accelerator.num_processes > 1:
            value = float(self.accelerator.reduce(loss.detach().reshape(1), "mean").item())
        if not math.isfinite(value):
            saved = ckpt.list_checkpoints(self.exp_dir)
            keep = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"the loss became {value} at step {self.step + 1}; stopping ({keep}). "
                "Lower the learning rate, check the data, or use mixed_precision = \"no\"."
            )
        return loss, value


def _builtin_loss(name: str) -> Any:
    """A registered loss built with its default config."""
    comp = get_registry().losses.get(name)
    return comp.build(comp.config())


def _latent_factor(vae: Any) -> int:
    """Pixels per latent side: 2 ** (number of VAE down blocks - 1), 8 for SD."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def run(pipeline: Pipeline, *, resume: Optional[str] = None) -> RunResult:
    """Train a validated pipeline; ``resume`` is ``"latest"`` or a checkpoint folder."""
    trainer = Trainer(pipeline)
    trainer.setup()
    if resume:
        trainer.resume(resume)
    return trainer.train()
