"""Trackers: where the main process logs scalars and sample images (hook ``hcp_register_trackers``).

``train.trackers`` names them (``["tensorboard", { type = "wandb", project = "x" }]``); unset, a run
logs to TensorBoard when it is installed, as before trackers were chosen. The loop talks to one
object, ``run.writer`` (a :class:`Trackers`), whose ``add_scalar``/``add_image``/``flush``/``close``
reach every chosen tracker. Other ranks get no writer: only the main process tracks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np

from ..config.pipeline import pipeline_to_dict
from ..config.schema import Pipeline
from ..interfaces import Tracker, TrackerContext
from ..registry import TrackerSpec
from .packages import missing_package

log = logging.getLogger("hcp")

#: The tracker an unset ``train.trackers`` uses when its package is installed.
DEFAULT_TRACKER = "tensorboard"


class Trackers:
    """``run.writer``: every call goes to each chosen tracker, in ``train.trackers`` order."""

    def __init__(self, trackers: List[Tuple[str, Tracker]]) -> None:
        self.trackers = trackers

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self.trackers]

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for _, tracker in self.trackers:
            tracker.add_scalar(tag, float(value), step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "HWC") -> None:
        """``image``: a PIL image or an ``HxWx3`` uint8 array (``dataformats`` is accepted for
        TensorBoard's signature; only HWC is supported)."""
        if dataformats != "HWC":
            raise ValueError(f"trackers take HWC images, got dataformats={dataformats!r}")
        array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        for _, tracker in self.trackers:
            tracker.add_image(tag, array, step)

    def flush(self) -> None:
        for _, tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for _, tracker in self.trackers:
            tracker.close()


def chosen_trackers(pipeline: Pipeline) -> List[TrackerSpec]:
    """``train.trackers``, or when unset TensorBoard if its package is installed (else none, with a warning)."""
    if pipeline.train.trackers is not None:
        return list(pipeline.train.trackers)
    family = pipeline.registry.trackers
    if DEFAULT_TRACKER not in family:
        return []
    spec = TrackerSpec(component=family.get(DEFAULT_TRACKER), config=family.get(DEFAULT_TRACKER).config())
    problem = missing_package(spec, "train.trackers")
    if problem:
        log.warning("no TensorBoard logs: %s (or set train.trackers = [] to silence this)", problem.split(": ", 1)[1])
        return []
    return [spec]


def open_trackers(pipeline: Pipeline, exp_dir: Path) -> Optional[Trackers]:
    """The main process's :class:`Trackers` (None when no tracker is chosen)."""
    specs = chosen_trackers(pipeline)
    if not specs:
        return None
    context = TrackerContext(exp_dir=str(exp_dir), run_name=Path(exp_dir).name, config=pipeline_to_dict(pipeline))
    opened: List[Tuple[str, Tracker]] = []
    try:
        for spec in specs:
            opened.append((spec.name, spec.build(context=context)))
    except BaseException:
        Trackers(opened).close()
        raise
    log.info("tracking with %s", ", ".join(name for name, _ in opened))
    return Trackers(opened)
