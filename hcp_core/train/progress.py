"""Progress on a terminal (a bar with step, loss, lr, it/s, ETA) or plain log lines elsewhere."""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("hcp")


class Progress:
    """Reports each optimizer step; a tqdm bar on a terminal, a log line every ``every`` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True) -> None:
        self.total, self.step, self.every, self.enabled = total, start, every, enabled
        self.t0, self.s0 = time.perf_counter(), start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        done = step - self.step
        self.step = step
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            return
        if step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            rate = (step - self.s0) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            log.info("step %d/%d loss %.5f lr %.3e %.2f it/s ETA %s", step, self.total, loss, lr, rate, _fmt(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
