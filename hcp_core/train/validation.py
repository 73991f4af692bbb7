"""``[validation]``: the loss on images the run does not train on, comparable across steps and runs.

Each validation dataset is a held-out split of a training dataset (``[validation.split.<name>]``,
:mod:`hcp_core.data.holdout`) or a dataset of its own (``[validation.data.<name>]``). Every
evaluation sees the same batches with the same crops, prompts, VAE latent samples, noise and
timesteps: they are keyed on (seed, :data:`VALIDATION_STEP`, sample), never on the training step.
So the curve moves only because the weights do, and two runs with the same seed give the same
curve.

The loss is the training objective (the loss plugin, min-SNR or flow weighting included) averaged
over every validation sample, computed under ``torch.no_grad`` with every model part in eval mode
(LoRA and other dropout off) using the trained weights (not the EMA ones, which only the final
export uses; a schedule-free optimizer's evaluation weights, which it exports). With several processes each evaluates a share of the batches and the sums are
all-reduced, so the value does not depend on the process count beyond float rounding.
"""
from __future__ import annotations

import logging
import zlib
from typing import Any, Dict, List, Mapping, Optional

import attrs
import torch

from ..data.dataset import BucketDataset, Collate
from ..data.holdout import validation_sources
from ..data.images import parse_colour
from ..data.prepare import DEFAULT_LATENT_FACTOR, PreparedDataset, prepare_dataset
from ..models.modes import modules_in_eval
from .optim import evaluation_weights

log = logging.getLogger("hcp")

#: The ``step`` validation noise, timesteps and VAE samples are keyed on: no training step is ever
#: this large (train.max_steps is at most 1e8), so validation never replays a training draw.
VALIDATION_STEP = 2**40


@attrs.frozen
class ValidationSet:
    """One validation dataset: its samples in fixed batches."""

    name: str
    dataset: BucketDataset
    collate: Collate
    batches: List[List[int]]  # sample indices per batch, same bucket within a batch, fixed order

    def sample_ids(self, indices: Any) -> List[int]:
        """Noise keys of a batch's samples: keyed on the set's name, not its position among the sets."""
        base = zlib.crc32(self.name.encode()) * 1_000_000_000
        return [base + int(i) for i in indices]


def fixed_batches(dataset: BucketDataset, batch_size: int) -> List[List[int]]:
    """Every sample once, bucket by bucket, in chunks of ``batch_size`` (the last may be smaller)."""
    return [members[i:i + batch_size] for members in dataset.bucket_members() for i in range(0, len(members), batch_size)]


def prepare_validation(pipeline: Any, *, latent_factor: int = DEFAULT_LATENT_FACTOR,
                       size_multiple: Optional[int] = None) -> Dict[str, PreparedDataset]:
    """Scan and bucket every validation dataset of ``pipeline`` (none without ``[validation]``)."""
    out: Dict[str, PreparedDataset] = {}
    for _, name, config, select in validation_sources(pipeline):
        out[name] = prepare_dataset(name, config, registry=pipeline.registry, base_dir=pipeline.base_dir, seed=pipeline.seed,
                                    verify_images=True, latent_factor=latent_factor, size_multiple=size_multiple,
                                    select=select)
        log.info("validation data %s: %d images", name, len(out[name].records))
    return out


class Validation:
    """The validation datasets of a run and how often they are evaluated."""

    def __init__(self, sets: List[ValidationSet], every: int) -> None:
        self.sets = sets
        self.every = every

    @classmethod
    def build(cls, pipeline: Any, prepared: Mapping[str, PreparedDataset], *,
              latent_factor: int = DEFAULT_LATENT_FACTOR) -> "Validation":
        """Wrap :func:`prepare_validation`'s datasets; batches use each dataset's ``batch_size``."""
        sets = []
        for name, prep in prepared.items():
            dataset = BucketDataset(prep, seed=pipeline.seed, latent_factor=latent_factor,
                                    background=parse_colour(prep.config.background))
            sets.append(ValidationSet(name, dataset, Collate(name, 1.0), fixed_batches(dataset, prep.config.batch_size)))
        return cls(sets, pipeline.validation.every)

    def due(self, step: int, total: int) -> bool:
        """Evaluate after ``step``: every ``every`` steps and after the last one."""
        return step == total or (self.every > 0 and step % self.every == 0)

    def evaluate(self, run: Any, step: int) -> Dict[str, float]:
        """The mean validation loss of each set; logged as ``val_loss/<name>`` and in train.log."""
        from .loop import per_sample_loss  # the training objective itself

        acc = run.accelerator
        rank, world = acc.process_index, acc.num_processes
        sums = [0.0] * (2 * len(self.sets))  # per set: the loss sum, the sample count
        # A schedule-free optimizer's evaluation weights are what it exports: validate those.
        # Eval mode (dropout off), and the global RNG left as it was for the training steps.
        with modules_in_eval(list(run.models.modules().values())), torch.random.fork_rng(devices=[]), \
                evaluation_weights(run.optimizer), torch.no_grad():
            for k, vset in enumerate(self.sets):
                for indices in vset.batches[rank::world]:  # each process a share; the sums are all-reduced
                    batch = vset.collate([vset.dataset[(i, 0)] for i in indices])
                    losses = per_sample_loss(run, batch, vset.sample_ids(batch["indices"]), VALIDATION_STEP,
                                             train_text=False)
                    sums[2 * k] += float(losses.double().sum())
                    sums[2 * k + 1] += losses.numel()
        if world > 1:
            sums = acc.reduce(torch.tensor(sums, dtype=torch.float64, device=acc.device), "sum").tolist()
        values = {vset.name: sums[2 * k] / sums[2 * k + 1] for k, vset in enumerate(self.sets)}
        if run.writer is not None:
            for name, value in values.items():
                run.writer.add_scalar(f"val_loss/{name}", value, step)
        log.info("validation at step %d: %s", step, ", ".join(f"val_loss/{n} {v:.5f}" for n, v in values.items()))
        return values
