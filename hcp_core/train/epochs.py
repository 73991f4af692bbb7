"""Epochs: how ``train.epochs`` and ``train.save_every_epochs`` map to optimizer steps.

Each optimizer step draws ``gradient_accumulation`` batches from every dataset, and every dataset
keeps its own epoch (see :mod:`hcp_core.data.loader`). The epochs that count are those of one
dataset, ``train.epoch_dataset``: by default the one with the most batches per epoch, so that
every dataset has been seen at least ``epochs`` times when the run ends. With ``B`` batches per
epoch of that dataset and ``A`` micro-batches per step, after step ``s`` it has drawn ``s*A``
batches: epoch ``e`` (1-based) ends at step ``ceil(e*B/A)``, and ``train.epochs = E`` trains
``ceil(E*B/A)`` steps. Everything here is a function of the step, so a resumed run counts on
exactly as the uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs

from ..errors import UserError


@attrs.frozen
class EpochPlan:
    """One run's length and epoch arithmetic."""

    dataset: str  # the dataset whose passes are the epochs
    batches: int  # its batches per epoch (per process: the same on every process)
    accumulation: int  # micro-batches per optimizer step
    total_steps: int  # optimizer steps the run trains
    epochs: Optional[int] = None  # train.epochs; None when the run is sized by max_steps

    def epochs_done(self, step: int) -> int:
        """Whole epochs of :attr:`dataset` completed after ``step`` optimizer steps."""
        return step * self.accumulation // self.batches

    def epoch_of(self, step: int) -> int:
        """The (1-based) epoch step ``step`` works on: the first one not finished when it began.
        So the step that ends epoch ``e`` shows ``e``, even when its last micro-batches already
        come from the next epoch (``gradient_accumulation`` not dividing the epoch)."""
        return self.epochs_done(step - 1) + 1 if step > 0 else 0

    def end_step(self, epoch: int) -> int:
        """The optimizer step in which ``epoch`` (1-based) of :attr:`dataset` ends."""
        return -(-epoch * self.batches // self.accumulation)

    def crosses_multiple(self, step: int, every: int) -> bool:
        """Whether ``step`` ends an epoch that is a multiple of ``every`` (0: never)."""
        return bool(every) and self.epochs_done(step) // every > self.epochs_done(step - 1) // every

    def describe(self, step: int) -> str:
        """``epoch 2/5`` (or ``epoch 2`` when the run is sized by max_steps) at ``step``."""
        epoch = self.epoch_of(step)
        return f"epoch {epoch}/{self.epochs}" if self.epochs is not None else f"epoch {epoch}"


def epoch_plan(train: Any, batches_per_epoch: Mapping[str, int]) -> EpochPlan:
    """The plan of ``train`` (a TrainConfig) over datasets with these batches per epoch (in pipeline order)."""
    name = train.epoch_dataset
    if name is None:  # the longest epoch; the first dataset on ties
        name = max(batches_per_epoch, key=lambda n: batches_per_epoch[n])
    elif name not in batches_per_epoch:
        raise UserError(f"train.epoch_dataset = {name!r} is not a dataset; datasets: {', '.join(batches_per_epoch)}")
    batches, acc = batches_per_epoch[name], train.gradient_accumulation
    total = train.max_steps if train.epochs is None else -(-train.epochs * batches // acc)
    return EpochPlan(dataset=name, batches=batches, accumulation=acc, total_steps=int(total), epochs=train.epochs)


def run_plan(pipeline: Any, data: Any) -> EpochPlan:
    """:func:`epoch_plan` of a pipeline over its built :class:`~hcp_core.data.loader.TrainData`."""
    return epoch_plan(pipeline.train, {name: s.batches_per_epoch for name, s in data.streams.items()})
