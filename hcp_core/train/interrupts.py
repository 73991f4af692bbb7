"""Stopping a run on request: Ctrl-C, ``docker stop``/Kubernetes/Slurm (SIGTERM) or a closed
terminal (SIGHUP) all end the current step, save a checkpoint and exit non-zero.

A handler only records the signal; the loop asks :meth:`StopSignals.agreed` after each step, so
the step in flight finishes cleanly and, under several processes, every rank stops at the same
step (the request is all-reduced). A second Ctrl-C while a stop is pending interrupts at once.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable, Dict, Optional

from ..errors import RunStopped

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopSignals:
    """Context manager that turns stop signals into a flag for the duration of the loop."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # pressed twice: the user does not want to wait for the step
        self.signum = self.signum or signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, reduce_max: Optional[Callable[[int], int]] = None) -> int:
        """The signal every process stops for (0: go on); ``reduce_max`` all-reduces across ranks."""
        return reduce_max(self.signum) if reduce_max is not None else self.signum


def stopped(signum: int, step: int, checkpoint: str) -> RunStopped:
    """The error a run raises after saving for a stop signal."""
    name = signal.Signals(signum).name
    return RunStopped(
        f"stopped by {name} at step {step}; saved {checkpoint}. Continue with: hcp run <pipeline> --resume",
        exit_code=128 + signum,
    )
