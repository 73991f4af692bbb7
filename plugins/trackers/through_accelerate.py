"""Trackers run through accelerate's tracker classes (``accelerate.tracking``): W&B, Comet, Aim,
MLflow, ClearML, DVCLive, SwanLab, Trackio. accelerate knows how each library starts, logs and
finishes; hcp adapts its ``log``/``log_images``/``finish`` to the writer calls the loop makes.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict

import numpy as np

from hcp_core.errors import UserError
from hcp_core.interfaces import TrackerContext

log = logging.getLogger("hcp")


def _scalar_config(config: Any, prefix: str = "") -> Dict[str, Any]:
    """The pipeline as ``{"train.max_steps": 100, ...}``: trackers store flat scalar hyper-parameters."""
    out: Dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            out.update(_scalar_config(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(config, (bool, int, float, str)) or config is None:
        out[prefix] = config
    else:
        out[prefix] = str(config)
    return out


class AccelerateTracker:
    """One ``accelerate.tracking`` tracker behind the writer interface."""

    def __init__(self, kind: str, context: TrackerContext, run_name: str, **init_kwargs: Any) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        if kind not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"train.trackers: this accelerate has no '{kind}' tracker; upgrade it: pip install -U accelerate")
        cls = LOGGER_TYPE_TO_CLASS[kind]
        args = (run_name, os.path.join(context.exp_dir, kind)) if cls.requires_logging_directory else (run_name,)
        self.name = kind
        self.tracker = cls(*args, **init_kwargs)
        if callable(getattr(self.tracker, "start", None)):  # accelerate >= 1.2 starts trackers here, not in __init__
            self.tracker.start()
        self.tracker.store_init_configuration(_scalar_config(dict(context.config)))
        self._warned_images = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.tracker.log({tag: value}, step=step)

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        if callable(getattr(self.tracker, "log_images", None)):
            self.tracker.log_images({tag: [image]}, step=step)
        elif not self._warned_images:
            self._warned_images = True
            log.warning("the %s tracker takes no images: sample images go to the other trackers and samples/", self.name)

    def flush(self) -> None:
        pass  # the libraries send on their own schedule; finish() sends the rest

    def close(self) -> None:
        self.tracker.finish()


def wandb(config: Any, *, context: TrackerContext) -> AccelerateTracker:
    kwargs = {"name": config.name or context.run_name, "dir": context.exp_dir, "tags": list(config.tags) or None}
    kwargs.update({k: v for k, v in (("entity", config.entity), ("mode", config.mode)) if v is not None})
    return AccelerateTracker("wandb", context, config.project or "hcp", **kwargs)


def _through_accelerate(name: str):  # type: ignore[no-untyped-def]
    def factory(config: Any, *, context: TrackerContext) -> AccelerateTracker:
        return AccelerateTracker(name, context, config.project or context.run_name)

    factory.__name__ = name
    return factory


comet_ml = _through_accelerate("comet_ml")
aim = _through_accelerate("aim")
mlflow = _through_accelerate("mlflow")
clearml = _through_accelerate("clearml")
dvclive = _through_accelerate("dvclive")
swanlab = _through_accelerate("swanlab")
trackio = _through_accelerate("trackio")
