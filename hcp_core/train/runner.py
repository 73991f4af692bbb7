"""``hcp run``: set up (:mod:`.setup`), resume if asked (:func:`restore`), train (:mod:`.loop`)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, List, Optional, Tuple

import attrs

from ..config.pipeline import pipeline_to_dict
from ..config.schema import Pipeline
from . import checkpoint as ckpt
from .loop import RunResult, TrainingDiverged, agreed_export, train
from .optim import build_scheduler
from .epochs import run_plan
from .resume import SCHEDULE_LENGTH_KEYS, check_resume_config
from .setup import Run, build_adapters, build_run
from .sharding import shard_optimizer_state, shard_state

__all__ = ["RunResult", "TrainingDiverged", "build_adapters", "build_run", "restore", "run", "train"]

log = logging.getLogger("hcp")


def run(pipeline: Pipeline, *, resume: Optional[str] = None, overwrite: bool = False) -> RunResult:
    """Train a validated pipeline.

    ``resume`` is ``"latest"`` or a checkpoint folder. A fresh run refuses an ``exp_dir`` that
    holds another run unless ``overwrite`` (the old run is moved to ``<exp_dir>.old-<time>``).
    """
    if resume and resume != "latest":
        ckpt.resolve_resume(Path(pipeline.base_dir) / pipeline.exp_dir, resume)  # a wrong path fails before the model loads
    built = build_run(pipeline, resume=bool(resume), overwrite=overwrite)
    try:
        start = 0
        if resume:
            built, start = restore(built, resume)
        return train(built, start)
    finally:
        built.close()


def restore(run: Run, where: str) -> Tuple[Run, int]:
    """Load checkpoint ``where`` into ``run``; returns the run (its scheduler may be rebuilt) and the step.

    Config changes since the checkpoint are applied or refused (see :mod:`.resume`); exports a
    kill cut off are written again.
    """
    path, trainable, state, meta = ckpt.load_resume_point(run.exp_dir, where)
    applied: List[str] = []
    if "config" in meta:
        sections = sorted(run.pipeline.registry.adapter_sections())
        applied = check_resume_config(meta["config"], pipeline_to_dict(run.pipeline), sections, str(path))
    else:
        log.warning("%s predates config checks: changes to the pipeline since then are not verified", path)
    with run.gathered(write_back=True):  # with FSDP: loaded into whole weights, then into each shard
        for name, adapter in run.adapters:
            prefix = f"{name}/"
            adapter.load_trainable_state({k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix)})
    configured = [g.get("max_lr", g.get("initial_lr", g["lr"])) for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], run.optimizer) if run.sharding else
                                  state["optimizer"])
    if any(_changes_schedule(line) for line in applied):
        run = attrs.evolve(run, lr_scheduler=_rebuilt_schedule(run, configured, state["scheduler"]))
    else:
        run.lr_scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None and state["ema"]:
        run.ema.load_state_dict({k: shard_state(v, run.ema.shadow[int(k.split(".")[1])]) for k, v in state["ema"].items()})
    run.data.load_state_dict(state["data"])
    ckpt.set_rng_state(state["rng"])
    step = int(meta["step"])
    log.info("resumed from %s at step %d", path, step)
    for line in applied:
        log.info("resume: applied the changed value %s", line)
    if not ckpt.is_exported(path):  # every process knows (the folder is shared); with FSDP all gather
        log.info("the exports of step %d were cut off; writing them again", step)
        agreed_export(run, step)
        if run.is_main:
            ckpt.mark_exported(path)
    run.accelerator.wait_for_everyone()
    return run, step


def _changes_schedule(line: str) -> bool:
    key = line.split(":", 1)[0]
    return key.endswith(".lr") or key.startswith("train.scheduler.") or key in SCHEDULE_LENGTH_KEYS


def _rebuilt_schedule(run: Run, configured: List[float], saved: Any) -> Any:
    """A scheduler for the new learning rates / schedule, positioned at the saved step."""
    for group, lr in zip(run.optimizer.param_groups, configured):
        for key in ("initial_lr", "max_lr", "min_lr"):
            group.pop(key, None)
        group["lr"] = lr
    cfg = run.pipeline.train
    total = run_plan(run.pipeline, run.data).total_steps
    scheduler = build_scheduler(run.optimizer, cfg.scheduler, max(total, int(saved["last_epoch"]) + 1))
    scheduler.last_epoch = int(saved["last_epoch"])
    with warnings.catch_warnings():  # get_lr outside step() warns; the closed form is what we want
        warnings.simplefilter("ignore")
        lrs = scheduler.get_lr()
    for group, lr in zip(run.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    return scheduler
