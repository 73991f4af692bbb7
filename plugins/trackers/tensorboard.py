"""The TensorBoard tracker: a ``SummaryWriter`` on ``<exp_dir>/<log_dir>``."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from hcp_core.interfaces import TrackerContext


class TensorboardTracker:
    """Scalars and ``HxWx3`` images as TensorBoard events."""

    def __init__(self, config: Any, *, context: TrackerContext) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(context.exp_dir, config.log_dir))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
