"""Progress: a bar on a terminal (step, epoch, loss, lr, it/s, ETA) and a ``train.log`` line every
``log_every`` steps either way; :class:`StepStats` holds what the last optimizer step measured."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Dict, List, Optional

import attrs

log = logging.getLogger("hcp")


@attrs.define
class StepStats:
    """What optimizer step ``step`` (1-based) measured: its loss, each dataset's own mean loss
    (before ``loss_weight``) and every parameter group's learning rate *during* that step (the
    scheduler steps right after, so reading the optimizer later gives the next step's)."""

    step: int = 0
    loss: float = float("nan")
    datasets: Dict[str, float] = attrs.field(factory=dict)
    lrs: List[float] = attrs.field(factory=list)
    #: Seconds the step waited for the data loader (a GPU starved by decoding shows here).
    data_wait: float = 0.0

    def record(self, step: int, loss: float, datasets: Dict[str, float], lrs: List[float],
               data_wait: float = 0.0) -> None:
        """Replace the contents with step ``step``'s values."""
        self.step, self.loss, self.datasets, self.lrs = step, loss, dict(datasets), list(lrs)
        self.data_wait = data_wait


class Progress:
    """Reports each optimizer step: a tqdm bar on a terminal, and a log line every ``every`` steps
    (and at the last) in ``train.log``; off a terminal the line also goes to the console.

    ``plan`` (an :class:`~hcp_core.train.epochs.EpochPlan`) adds the epoch to both.
    """

    def __init__(self, total: int, start: int, every: int, enabled: bool = True, plan: Any = None) -> None:
        self.total, self.step, self.every, self.enabled, self.plan = total, start, every, enabled, plan
        self.t0, self.s0 = time.perf_counter(), start
        self.waited, self.waited_steps = 0.0, 0  # data-loader waits since the last log line
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float, data_wait: float = 0.0) -> None:
        """Step ``step`` is done; ``lr`` is the learning rate it used, ``data_wait`` the seconds it
        waited for its batches (the log line gives their mean since the previous line)."""
        if not self.enabled:
            return
        done = step - self.step
        self.step = step
        self.waited, self.waited_steps = self.waited + data_wait, self.waited_steps + done
        epoch = f" {self.plan.describe(step)}" if self.plan is not None else ""
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_description(f"train{epoch}", refresh=False)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            rate = (step - self.s0) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            wait_ms = 1000 * self.waited / max(self.waited_steps, 1)
            self.waited, self.waited_steps = 0.0, 0
            args = ("step %d/%d%s loss %.5f lr %.3e %.2f it/s data wait %.0f ms/step ETA %s", step, self.total, epoch,
                    loss, lr, rate, wait_ms, _fmt(eta))
            if self.bar is None:
                log.info(*args)
            else:  # the bar already shows it on the terminal: only the log file gets the line
                _to_files(logging.INFO, *args)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _to_files(level: int, msg: str, *args: Any) -> None:
    """Log a record through the ``hcp`` logger's file handlers only (not the console's)."""
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, msg, args, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


def _fmt(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
