"""hcp: fine-tune text-to-image diffusion models from composable plugin pipelines.

Library use::

    import hcp_core
    pipeline = hcp_core.load_config("examples/quickstart.toml", overrides=["train.max_steps=5"])
    hcp_core.run(pipeline)

Importing this package is cheap: torch loads only when training starts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .config import build_pipeline, load_config, pipeline_to_dict
from .errors import ConfigError, DataError, UserError
from .hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .config.schema import Pipeline


def run(config: "Pipeline", *, resume: Optional[str] = None, overwrite: bool = False) -> Any:
    """Train ``config`` (a :class:`~hcp_core.config.schema.Pipeline`); see :func:`hcp_core.train.runner.run`."""
    from .train.runner import run as _run

    return _run(config, resume=resume, overwrite=overwrite)


__all__ = ["ConfigError", "DataError", "UserError", "build_pipeline", "hookimpl", "load_config", "pipeline_to_dict", "run"]
