"""Built-in trackers: TensorBoard (hcp's own writer, ``<exp_dir>/logs``), Weights & Biases, and the
other trackers accelerate supports (comet_ml, aim, mlflow, clearml, dvclive, swanlab, trackio),
each needing its own package. Used as ``train.trackers = ["tensorboard", { type = "wandb", project = "x" }]``.
"""
from __future__ import annotations

from typing import ClassVar, List, Optional

import attrs

from hcp_core.config.validators import not_blank, one_of
from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry


@attrs.define
class TensorboardConfig:
    """TensorBoard event files (scalars and sample images) in <exp_dir>/<log_dir>."""

    #: Folder inside the run folder.
    log_dir: str = attrs.field(default="logs", validator=not_blank)
    requires: ClassVar[tuple] = (("tensorboard", "tensorboard"),)


@attrs.define
class WandbConfig:
    """Weights & Biases (wandb): scalars, sample images and the resolved pipeline as the run's config."""

    #: The W&B project; unset: "hcp".
    project: Optional[str] = attrs.field(default=None, validator=not_blank)
    #: The W&B team or user; unset: your default entity.
    entity: Optional[str] = attrs.field(default=None, validator=not_blank)
    #: The run's name; unset: the run folder's name.
    name: Optional[str] = attrs.field(default=None, validator=not_blank)
    tags: List[str] = attrs.field(factory=list)
    #: "online", "offline" (sync later with `wandb sync`) or "disabled"; unset: WANDB_MODE or online.
    mode: Optional[str] = attrs.field(default=None, validator=one_of(("online", "offline", "disabled")))
    requires: ClassVar[tuple] = (("wandb", "wandb"),)


@attrs.define
class AccelerateTrackerConfig:
    """Options of the trackers run through accelerate.tracking."""

    #: The project / experiment name accelerate passes on; unset: the run folder's name.
    project: Optional[str] = attrs.field(default=None, validator=not_blank)


@attrs.define
class CometMlConfig(AccelerateTrackerConfig):
    """Comet (comet_ml, through accelerate): scalars; the project is Comet's project name."""

    requires: ClassVar[tuple] = (("comet_ml", "comet-ml"),)


@attrs.define
class AimConfig(AccelerateTrackerConfig):
    """Aim (through accelerate): scalars and images in an Aim repository in <exp_dir>/aim."""

    requires: ClassVar[tuple] = (("aim", "aim"),)


@attrs.define
class MlflowConfig(AccelerateTrackerConfig):
    """MLflow (through accelerate): scalars; the project is the MLflow experiment name."""

    requires: ClassVar[tuple] = (("mlflow", "mlflow"),)


@attrs.define
class ClearmlConfig(AccelerateTrackerConfig):
    """ClearML (through accelerate): scalars and images; the project is the ClearML task name."""

    requires: ClassVar[tuple] = (("clearml", "clearml"),)


@attrs.define
class DvcliveConfig(AccelerateTrackerConfig):
    """DVCLive (through accelerate): scalars in the DVC experiment of the current repository."""

    requires: ClassVar[tuple] = (("dvclive", "dvclive"),)


@attrs.define
class SwanlabConfig(AccelerateTrackerConfig):
    """SwanLab (through accelerate): scalars and images; the project is SwanLab's project name."""

    requires: ClassVar[tuple] = (("swanlab", "swanlab"),)


@attrs.define
class TrackioConfig(AccelerateTrackerConfig):
    """Trackio (through accelerate): scalars; the project is Trackio's project name."""

    requires: ClassVar[tuple] = (("trackio", "trackio"),)


_ACCELERATE = "hcp_plugins.trackers.through_accelerate"
#: name -> config class of the trackers hcp runs through accelerate's classes.
ACCELERATE_TRACKERS = {
    "comet_ml": CometMlConfig, "aim": AimConfig, "mlflow": MlflowConfig, "clearml": ClearmlConfig,
    "dvclive": DvcliveConfig, "swanlab": SwanlabConfig, "trackio": TrackioConfig,
}


@hookimpl
def hcp_register_trackers(registry: FamilyRegistry) -> None:
    registry.add("tensorboard", config=TensorboardConfig, factory="hcp_plugins.trackers.tensorboard:TensorboardTracker")
    registry.add("wandb", config=WandbConfig, factory=f"{_ACCELERATE}:wandb")
    for name, config in ACCELERATE_TRACKERS.items():
        registry.add(name, config=config, factory=f"{_ACCELERATE}:{name}")
