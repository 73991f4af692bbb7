"""The training loop: :func:`train` reads top to bottom, one optimizer step per iteration.

Each optimizer step draws ``gradient_accumulation`` micro-batches from *every* dataset; a
dataset's loss is weighted by its ``loss_weight``. Only the main process writes files. A stop
signal ends the current step, saves and raises :class:`~hcp_core.errors.RunStopped`; a
non-finite loss or non-finite trained weights stop the run before anything bad is saved.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import attrs
import torch

from ..config.pipeline import pipeline_to_dict
from ..devices import to_device
from ..errors import UserError
from ..interfaces import LossInputs
from . import checkpoint as ckpt
from .diffusion import sample_seed
from .epochs import run_plan
from .interrupts import StopSignals, stopped
from .optim import evaluation_weights
from .progress import Progress
from .sample_images import sample_due
from .setup import Run, agreed
from .sharding import Sharding

log = logging.getLogger("hcp")


class TrainingDiverged(UserError):
    """The loss or the trained weights became NaN or infinite; the last good checkpoint is kept."""


@attrs.frozen
class RunResult:
    """What a finished run left behind."""

    exp_dir: str
    step: int
    exports: List[str]
    last_loss: float


def train(run: Run, start: int = 0) -> RunResult:
    """Train from step ``start`` to the plan's last step (``train.max_steps``, or ``train.epochs``
    of the epoch dataset: :mod:`.epochs`); save, export and return what was written."""
    cfg = run.pipeline.train
    plan = run_plan(run.pipeline, run.data)
    total = plan.total_steps
    step, last_saved, last_loss = start, start, float("nan")
    progress = Progress(total, step, cfg.log_every, enabled=run.is_main, plan=plan)
    with StopSignals() as stop:
        try:
            while step < total:
                last_loss = settle_step(run, step, optimizer_step(run, step))
                step += 1
                if run.ema is not None:
                    run.ema.update()
                log_step(run, progress, step, last_loss)
                if run.validation is not None and run.validation.due(step, total):
                    with run.gathered():
                        run.validation.evaluate(run, step)
                if run.pipeline.sample is not None and sample_due(run.pipeline.sample, step, total):
                    with run.gathered():  # with FSDP every process gathers; the main one renders
                        if run.renderer is not None:
                            run.renderer.sample(step)
                signum = stop.agreed(lambda s: _reduce_max(run, s))
                if signum:
                    if step > last_saved or not ckpt.list_checkpoints(run.exp_dir):
                        log.info("interrupted: saving a checkpoint at step %d before exiting", step)
                        save(run, step)
                    raise stopped(signum, step, str(ckpt.checkpoints_dir(run.exp_dir) / f"step-{step:08d}"))
                every_steps = bool(cfg.save_every) and step % cfg.save_every == 0
                if (every_steps or plan.crosses_multiple(step, cfg.save_every_epochs)) and step < total:
                    save(run, step)
                    last_saved = step
        finally:
            progress.close()
    run.data.close()
    if step > last_saved or not ckpt.list_checkpoints(run.exp_dir):
        save(run, step)
    check_ranks_agree(run)
    exports = agreed_export(run, None)
    if run.pipeline.sample is not None:  # with the exported weights (EMA swapped in, if any)
        with run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext(), run.gathered():
            if run.renderer is not None:
                run.renderer.sample(step)
    if run.is_main:
        log.info("done: %d steps, exports: %s", step, ", ".join(exports) or "none")
    run.accelerator.wait_for_everyone()
    return RunResult(exp_dir=str(run.exp_dir), step=step, exports=exports, last_loss=last_loss)


@attrs.frozen
class PendingStep:
    """An optimizer step's loss values, still on the device until :func:`settle_step` reads them."""

    #: ``[loss, loss of each dataset...]``, averaged over micro-steps and processes.
    values: torch.Tensor
    datasets: Tuple[str, ...]
    #: Each parameter group's learning rate during the step.
    lrs: List[float]
    #: Seconds the step waited for the data loader's batches.
    data_wait: float = 0.0


def optimizer_step(run: Run, step: int) -> PendingStep:
    """One optimizer step (``gradient_accumulation`` micro-steps); its losses stay on the device.

    Nothing here waits for the GPU: reading the loss between forward and backward would keep
    the host from queuing the backward while the forward still runs.
    """
    cfg, acc = run.pipeline.train, run.accelerator
    total: Optional[torch.Tensor] = None
    names: Tuple[str, ...] = ()
    waited = 0.0
    for micro in range(cfg.gradient_accumulation):
        if run.grad_sync is not None:  # buckets start reducing during the last micro-step's backward
            run.grad_sync.micro_step(micro, cfg.gradient_accumulation)
        asked = time.perf_counter()
        batches = run.data.next_batches()
        waited += time.perf_counter() - asked
        # Dropout draws from the global RNG (gradient checkpointing replays it); keying it on the
        # step means nothing else that touches it (previews, plugins) can make a resume differ.
        torch.manual_seed(sample_seed(run.pipeline.seed, step, micro, stream=2))
        if run.compiled is not None:
            run.compiled.micro_step_begins()
        loss, values, names = guarded_loss(run, batches, step)
        share = values / cfg.gradient_accumulation
        total = share if total is None else total + share
        if loss.requires_grad:  # e.g. no prompt held a trained word this micro-step
            acc.backward(loss / cfg.gradient_accumulation)
    sync_grads(run)
    if cfg.max_grad_norm:
        acc.clip_grad_norm_(run.trained_params, cfg.max_grad_norm)
    run.optimizer.step()
    lrs = [float(g["lr"]) for g in run.optimizer.param_groups]  # the scheduler moves on next
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    assert total is not None
    return PendingStep(total, names, lrs, waited)


def settle_step(run: Run, step: int, pending: PendingStep) -> float:
    """Read step ``step``'s (0-based) losses and check the updated weights, in one transfer (the
    step's only wait for the GPU); a non-finite loss or weight stops the run before anything of
    it is saved. Records :class:`~.progress.StepStats` and returns the step's loss.
    """
    device = pending.values.device
    local = [p.detach() for p in run.trained_params]
    if run.sharding is not None:  # each process checks its own part of a shard
        local = [p.to_local() if Sharding.is_sharded(p) else p for p in local]
    norms = torch._foreach_norm(local) if local else []
    weight_sum = torch.stack([n.float().to(device) for n in norms]).sum() if norms else torch.zeros((), device=device)
    if run.sharding is not None:  # a NaN in one process's shard stops every process
        weight_sum = run.accelerator.reduce(weight_sum, "sum")
    value, *parts, weight_total = torch.cat([pending.values.float().flatten(), weight_sum.reshape(1)]).tolist()
    if not math.isfinite(value):
        raise TrainingDiverged(f"the loss became {value} at step {step + 1}; stopping ({_last_good(run)}). "
                               "Lower the learning rate, check the data, or use mixed_precision = \"no\".")
    if not math.isfinite(weight_total):
        raise TrainingDiverged(
            f"the trained weights became NaN or infinite in the update of step {step + 1}; stopping without saving "
            f"them ({_last_good(run)}). Lower the learning rate or set train.max_grad_norm."
        )
    run.stats.record(step + 1, value, dict(zip(pending.datasets, parts)), pending.lrs, pending.data_wait)
    return value


def latents_of(run: Run, batch: Dict[str, Any], sample_ids: List[int], step: int) -> torch.Tensor:
    """Scaled VAE latents of a batch: cached ones, or encoded now (sampled per sample)."""
    dev = run.accelerator.device
    if "latents" in batch:
        return to_device(batch["latents"], dev).contiguous()
    vae = run.models.vae
    with torch.no_grad():
        pixels = to_device(batch["pixel_values"], dev, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        eps = to_device(torch.stack([
            torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
                sample_seed(run.pipeline.seed, step, sid, stream=1)))
            for sid in sample_ids
        ]), dev)
        z = dist.mean.float() + dist.std.float() * eps
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z - shift
        # The VAE can hand back channels-last tensors; GroupNorm's CPU backward crashes on those
        # when the norm trains but its input needs no gradient (fine-tuning norm layers).
        return (z * vae.config.scaling_factor).contiguous()


def per_sample_loss(run: Run, batch: Dict[str, Any], ids: List[int], step: int, *, train_text: bool) -> torch.Tensor:
    """The training objective of each sample of one batch ([B]): latents, the family's
    prediction, the loss plugin and the family's weights (min-SNR, flow weighting)."""
    latents = latents_of(run, batch, ids, step)
    out = run.family.training_prediction(
        run.models, run.prompt_encoder, batch, latents, ids, seed=run.pipeline.seed, step=step,
        train=run.pipeline.train, autocast=run.accelerator.autocast, train_text=train_text,
    )
    weight_map = batch.get("weight_map")
    per_sample = run.loss_fn(out.pred.float(), out.target.float(), LossInputs(
        timesteps=out.timesteps, weight_map=None if weight_map is None else to_device(weight_map, out.pred.device),
        snr=out.snr))
    return per_sample * out.weights if out.weights is not None else per_sample


def dataset_losses(run: Run, batches: Dict[str, Dict[str, Any]], step: int) -> Dict[str, torch.Tensor]:
    """Each dataset's mean loss for one micro-step (before its ``loss_weight``)."""
    out: Dict[str, torch.Tensor] = {}
    for ordinal, (name, batch) in enumerate(batches.items()):
        # Sample ids are stable across batch layouts and process counts (see diffusion.py).
        ids = [ordinal * 1_000_000_000 + int(i) for i in batch["indices"]]
        out[name] = per_sample_loss(run, batch, ids, step, train_text=run.train_text).mean()
    return out


def weighted_sum(batches: Dict[str, Dict[str, Any]], losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's loss: the sum over datasets of ``loss_weight`` x their mean loss."""
    total: Optional[torch.Tensor] = None
    for name, batch in batches.items():  # added in dataset order, as always: the same float sums
        term = losses[name] * batch["loss_weight"]
        total = term if total is None else total + term
    assert total is not None
    return total


def batch_loss(run: Run, batches: Dict[str, Dict[str, Any]], step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One micro-step's loss (the ``loss_weight``-ed sum over datasets) and each dataset's mean loss."""
    losses = dataset_losses(run, batches, step)
    return weighted_sum(batches, losses), losses


def guarded_loss(run: Run, batches: Dict[str, Dict[str, Any]],
                 step: int) -> Tuple[torch.Tensor, torch.Tensor, Tuple[str, ...]]:
    """The micro-step's loss, and on the device ``[loss, each dataset's loss...]`` (averaged over
    processes) with the datasets' names; out-of-memory becomes a clear error."""
    try:
        loss, losses = batch_loss(run, batches, step)
    except torch.OutOfMemoryError:
        sizes = ", ".join(f"data.{name}: batch {len(b['indices'])} at {b['target_size_hw'][0][1]}x{b['target_size_hw'][0][0]}"
                          for name, b in batches.items())
        raise UserError(f"out of memory at step {step + 1} ({sizes}); lower batch_size or the resolution, "
                        "or enable model.gradient_checkpointing / mixed precision") from None
    # One reduction for the total and every dataset's part.
    values = torch.stack([loss.detach().float(), *(v.detach().float() for v in losses.values())])
    if run.accelerator.num_processes > 1:
        values = run.accelerator.reduce(values, "mean")
    return loss, values, tuple(losses)


def _last_good(run: Run) -> str:
    saved = ckpt.list_checkpoints(run.exp_dir)
    return f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"


def log_step(run: Run, progress: Progress, step: int, loss: float) -> None:
    """Progress bar and log line, and the tracker's scalars: ``loss``, ``loss/<dataset>``, the
    learning rates step ``step`` used and ``time/data_wait`` (seconds the step waited for its
    batches), as :func:`settle_step` recorded them in ``run.stats``."""
    stats = run.stats if run.stats.step == step else None  # None: a wrapper replaced the step
    lrs = stats.lrs if stats is not None else [float(g["lr"]) for g in run.optimizer.param_groups]
    data_wait = stats.data_wait if stats is not None else 0.0
    progress.update(step, loss, lrs[0], data_wait)
    if run.writer is not None:
        run.writer.add_scalar("loss", loss, step)
        run.writer.add_scalar("time/data_wait", data_wait, step)
        for name, value in (stats.datasets if stats is not None else {}).items():
            run.writer.add_scalar(f"loss/{name}", value, step)
        for g, lr in zip(run.optimizer.param_groups, lrs):
            run.writer.add_scalar(f"lr/{g.get('name', 'group')}", lr, step)


def save(run: Run, step: int) -> None:
    """Checkpoint (all ranks wait) and export user-facing files; the main process writes. A failure
    on one process (a full disk, an export error) stops every process with a message
    (:func:`.setup.agreed`)."""
    run.accelerator.wait_for_everyone()
    path = agreed(run.accelerator, f"step {step}: the main process could not write its checkpoint",
                  lambda: write_checkpoint(run, step))
    agreed_export(run, step)
    if run.is_main:
        ckpt.mark_exported(path)
        log.info("saved checkpoint %s", path)
    run.accelerator.wait_for_everyone()


def write_checkpoint(run: Run, step: int) -> Optional[Path]:
    """Checkpoint ``step`` written by the main process (its folder; None on the others). With FSDP
    every process takes part in gathering whole tensors."""
    if not run.is_main and run.sharding is None:
        return None
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.lr_scheduler.state_dict(),
        "rng": ckpt.rng_state(),
        "data": run.data.state_dict(),
        "ema": run.ema.state_dict() if run.ema else {},
    }
    trainable = run.trainable_state()
    if run.sharding is not None:  # checkpoints hold whole tensors, with or without FSDP
        state, trainable = run.sharding.full((state, trainable), keep=run.is_main)
    if not run.is_main:
        return None
    meta = {"max_steps": run_plan(run.pipeline, run.data).total_steps, "config": pipeline_to_dict(run.pipeline)}
    return ckpt.save_checkpoint(run.exp_dir, step, trainable=trainable, training_state=state, meta=meta,
                                keep=run.pipeline.train.keep_checkpoints)


def agreed_export(run: Run, step: Optional[int]) -> List[str]:
    """:func:`export` on every process; a failure stops every process with a message."""
    what = "the final export" if step is None else f"step {step}: the export"
    return agreed(run.accelerator, f"{what} failed on the main process", lambda: export(run, step))


def export(run: Run, step: Optional[int]) -> List[str]:
    """Every adapter's user-facing files for ``step`` (None: the final ones, EMA weights if on),
    written by the main process; call it on every process (with FSDP they gather the weights)."""
    if not run.is_main and run.sharding is None:
        return []
    ema = run.ema.swapped_in() if run.ema is not None and step is None else contextlib.nullcontext()
    with ema, evaluation_weights(run.optimizer), run.weights_readable():  # schedule-free: its averaged weights
        if not run.is_main:
            return []
        return [path for _, adapter in run.adapters for path in adapter.export(run.models, str(run.exp_dir), step)]


def sync_grads(run: Run) -> None:
    """Average the trained tensors' gradients over processes (what DDP would do): wait for the
    bucketed reductions :mod:`.grad_sync` started during backward."""
    if run.grad_sync is not None:
        run.grad_sync.finish()


def _reduce_max(run: Run, value: int) -> int:
    if run.accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=run.accelerator.device)
    return int(run.accelerator.reduce(t, "max").item())


def check_ranks_agree(run: Run) -> None:
    """Every process must end with bit-identical trained weights; say so or fail loudly."""
    n = run.accelerator.num_processes
    if n == 1:
        return
    digest = hashlib.sha256()
    for prm in run.trained_params:
        if not Sharding.is_sharded(prm):  # FSDP shards differ by design: each process holds its own part
            digest.update(prm.detach().float().cpu().numpy().tobytes())
    words = torch.tensor(list(digest.digest()[:16]), dtype=torch.int64, device=run.accelerator.device)
    gathered = run.accelerator.gather(words.reshape(1, -1)).reshape(n, -1)
    if not all(torch.equal(gathered[0], row) for row in gathered):
        raise RuntimeError("processes ended with different trained weights; gradients were not synchronised")
    sharded = sum(Sharding.is_sharded(prm) for prm in run.trained_params)
    if sharded == len(run.trained_params):
        log.info("every trained tensor is an FSDP shard (%d, one part on each of %d processes)", sharded, n)
        return
    note = f"; {sharded} more are FSDP shards, one part on each process" if sharded else ""
    log.info("all %d processes hold identical trained weights (sha256 %s...)%s", n, digest.hexdigest()[:12], note)

