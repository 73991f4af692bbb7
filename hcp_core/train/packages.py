"""Optional packages a pipeline's components need, checked before anything loads."""
from __future__ import annotations

import importlib.util
from typing import List, Optional

from ..config.schema import Pipeline
from ..errors import UserError
from ..registry import FAMILY_NOUNS, ComponentSpec


def missing_package(spec: ComponentSpec, where: str) -> Optional[str]:
    """The message for the first package ``spec``'s config ``requires`` that is not installed, or None."""
    for module, pip_name in getattr(type(spec.config), "requires", ()):
        if importlib.util.find_spec(module) is None:
            noun = FAMILY_NOUNS[spec.component.family]
            return (f"{where}: the {noun} '{spec.name}' needs the Python package '{pip_name}', which is not installed: "
                    f"pip install {pip_name}")
    return None


def check_packages(pipeline: Pipeline) -> None:
    """Raise one :class:`UserError` naming every missing package (and its pip command) that the
    chosen optimizer, scheduler and trackers declare in their config's ``requires``."""
    train = pipeline.train
    chosen = [("train.optimizer", train.optimizer), ("train.scheduler", train.scheduler)]
    chosen += [(f"train.trackers[{i}]", spec) for i, spec in enumerate(train.trackers or ())]
    problems: List[str] = [p for where, spec in chosen if spec is not None and (p := missing_package(spec, where))]
    if problems:
        raise UserError("\n".join(problems))
