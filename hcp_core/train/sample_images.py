"""Samples during training: the ``[sample]`` prompts rendered with the model as it is being trained.

Images go to ``<exp_dir>/samples/step-<N>/<k>.png`` (prompt ``k``, seed ``seed + k``) with a
``grid.png`` of them all, and to every tracker (``train.trackers``) as ``samples/<k>``. Rendering is
the model family's ``render``, the same call ``hcp generate`` makes, on the training modules
themselves: LoRA branches, custom words and clip skip apply as in training.

Sampling leaves training exactly as it was: every global RNG state is saved and restored around
it (the noise comes from its own seeded generators anyway), modules return to their train/eval
modes, and custom-word usage counts ignore the sample prompts. A run with sampling ends with the
same weights as one without. A schedule-free optimizer's averaged weights render (see
:func:`hcp_core.train.optim.evaluation_weights`), as they are what the run exports.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..config.schema import SampleConfig
from ..data.prompts import fill_placeholders
from ..generation.metadata import format_parameters, write_png
from ..generation.params import GenerationParams
from ..generation.render import make_grid, render_image
from ..interfaces import ModelBundle
from ..models.modes import modules_in_eval
from . import checkpoint as ckpt
from .optim import evaluation_weights

log = logging.getLogger("hcp")

SAMPLES_DIR = "samples"
GRID_NAME = "grid.png"


def step_folder(exp_dir: str | Path, step: int) -> Path:
    """``<exp_dir>/samples/step-<step>``."""
    return Path(exp_dir) / SAMPLES_DIR / f"step-{step}"


def rendered_modules(models: ModelBundle) -> List[torch.nn.Module]:
    """The modules a sample runs: UNet, text encoder(s) (SDXL's second too) and VAE."""
    return list(models.modules().values())


def _word_counts(encoder: Any) -> List[Dict[str, int]]:
    """The custom-word usage counts of ``encoder`` and of its per-text-encoder encoders (SDXL), each once."""
    counts: Dict[int, Dict[str, int]] = {}
    for holder in (encoder, *getattr(encoder, "encoders", ())):
        uses = getattr(holder, "uses", None)
        if isinstance(uses, dict):
            counts.setdefault(id(uses), uses)
    return list(counts.values())


@contextlib.contextmanager
def isolated_from_training(modules: List[torch.nn.Module], encoder: Any) -> Iterator[None]:
    """Eval mode and untouched global RNG streams inside; everything put back on the way out."""
    rng = ckpt.rng_state()
    counts = [(uses, dict(uses)) for uses in _word_counts(encoder)]
    try:
        with modules_in_eval(modules):
            yield
    finally:
        ckpt.set_rng_state(rng)
        for uses, before in counts:  # the "trained word appeared in no prompt" warning counts training prompts only
            uses.clear()
            uses.update(before)


def sample_due(config: Any, step: int, max_steps: int) -> bool:
    """Whether ``[sample]`` (``config``) renders after ``step``: a multiple of ``every``, not the
    last step (the run's end samples anyway)."""
    every = config.every
    return bool(every) and step % every == 0 and step < max_steps


class SampleRenderer:
    """Renders ``config``'s prompts with the run's models; the main process owns one."""

    def __init__(
        self,
        config: SampleConfig,
        *,
        models: ModelBundle,
        prompt_encoder: Any,
        exp_dir: str | Path,
        default_size: Tuple[int, int],
        model_path: str = "",
        clip_skip: int = 0,
        prediction_type: Optional[str] = None,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        writer: Optional[Any] = None,
        render: Optional[Callable[..., Any]] = None,
        optimizer: Optional[Any] = None,
    ) -> None:
        self.config = config
        self.models = models
        self.encoder = prompt_encoder
        self.exp_dir = Path(exp_dir)
        self.autocast = autocast
        #: The run's trackers (hcp_core.train.trackers.Trackers): add_image, flush.
        self.writer = writer
        #: The run's optimizer: a schedule-free one swaps its averaged weights in while rendering.
        self.optimizer = optimizer
        #: The model family's renderer; None: render_image (the family of ``models.kind``).
        self.render = render
        width, height = config.resolution(default_size)
        self.params = [
            GenerationParams(
                prompt=fill_placeholders(prompt, config.word_names), seed=config.seed + k, model=model_path,
                negative_prompt=config.negative_prompt, steps=config.steps, cfg=config.cfg,
                scheduler=config.scheduler, width=width, height=height, clip_skip=clip_skip,
                prediction_type=prediction_type,
            )  # fmt: skip
            for k, prompt in enumerate(config.prompts)
        ]

    def sample(self, step: int) -> List[Path]:
        """Render every prompt at ``step``; return the image files (grid last)."""
        folder = step_folder(self.exp_dir, step)
        images = []
        try:
            with isolated_from_training(rendered_modules(self.models), self.encoder), evaluation_weights(self.optimizer):
                for params in self.params:
                    images.append((self.render or render_image)(self.models, self.encoder, params, autocast=self.autocast))
        except torch.OutOfMemoryError:
            # Hours of training are worth more than one set of samples: skip them, say how to fit them.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("samples of step %d skipped: out of memory; lower [sample].size or sample fewer prompts", step)
            return []
        paths = []
        for k, (params, image) in enumerate(zip(self.params, images)):
            text = format_parameters(params, extra={"Training step": step, "Experiment": str(self.exp_dir)})
            paths.append(write_png(image, folder / f"{k:02d}.png", text))
            if self.writer is not None:
                self.writer.add_image(f"samples/{k}", np.asarray(image.convert("RGB")), step)
        grid = make_grid(images)
        grid.save(folder / GRID_NAME)
        paths.append(folder / GRID_NAME)
        if self.writer is not None:
            self.writer.flush()
        log.info("samples of step %d in %s", step, folder)
        return paths
