"""diffusers pipeline classes (by class name), imported without noise that is not for hcp's users.

Importing diffusers' Stable Diffusion pipelines imports transformers' image processors, and
transformers 5 then warns that the optional torchvision is not installed. hcp never uses an image
processor (no safety checker runs), so that warning only confuses; it is silenced for the import
alone, and transformers' own log level is put back afterwards.
"""
from __future__ import annotations

from typing import Any


def pipeline_class(name: str) -> Any:
    """diffusers' pipeline class ``name`` (e.g. "StableDiffusionXLPipeline"), imported quietly."""
    from transformers.utils import logging as transformers_logging

    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        import diffusers

        return getattr(diffusers, name)
    finally:
        transformers_logging.set_verbosity(before)


def quiet_progress_bars() -> None:
    """No per-file "Loading weights" / "Writing model shards" bars: hcp reports loading itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
