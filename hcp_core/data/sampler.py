"""Same-bucket batches, shuffled per epoch from the seed, split evenly over processes, resumable.

One epoch, for one dataset: every sample (image x repeat) once, in *global* batches of
``batch_size x world_size`` samples that each come from a single bucket. A bucket whose sample
count is not a multiple of that fills its last batch by repeating its own samples (so a bucket
smaller than a batch still trains, with repeats inside the batch). The batch list is shuffled;
rank r takes slice r of every global batch. So every rank gets the same number of batches, and
N processes with ``batch_size`` b train on exactly the global batches one process with
``batch_size`` N x b would.

The order is a pure function of (seed, dataset name, epoch), so a run resumed at
(epoch, batch) sees exactly the batches it would have seen.

Pure Python, no torch: the DataLoader accepts any iterable as ``batch_sampler``.
"""
from __future__ import annotations

import math
import random
from typing import Any, Dict, Iterator, List, Sequence, Tuple

#: What the sampler yields per sample: (sample index, epoch). The dataset seeds the sample's
#: random choices (crop, template, tag shuffle) from both, so resumed runs repeat them exactly.
SampleKey = Tuple[int, int]


class BucketBatchSampler:
    """Yields this rank's batches of one epoch, from the current position on."""

    def __init__(
        self,
        buckets: Sequence[Sequence[int]],
        batch_size: int,
        *,
        seed: int = 0,
        name: str = "",
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.buckets = [list(b) for b in buckets]
        if not any(self.buckets):
            raise ValueError("every bucket is empty")
        self.batch_size = batch_size
        self.seed = seed
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.global_batch = batch_size * world_size
        self.total_batches = sum(math.ceil(len(b) / self.global_batch) for b in self.buckets)
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        """Batches per epoch for each rank (the same on every rank, every epoch)."""
        return self.total_batches

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The global batches of ``epoch`` (``batch_size x world_size`` samples each), in order."""
        rng = random.Random(f"hcp-batches:{self.seed}:{self.name}:{epoch}")
        batches: List[List[int]] = []
        for members in self.buckets:
            if not members:
                continue
            order = list(members)
            if self.shuffle:
                rng.shuffle(order)
            size = self.global_batch
            short = (-len(order)) % size
            order += [order[i % len(order)] for i in range(short)]
            batches.extend(order[i : i + size] for i in range(0, len(order), size))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def rank_batches(self, epoch: int) -> List[List[int]]:
        """This rank's slice of every global batch of ``epoch``."""
        lo = self.rank * self.batch_size
        return [batch[lo : lo + self.batch_size] for batch in self.epoch_batches(epoch)]

    def set_position(self, epoch: int, batch: int) -> None:
        """Where the next iteration starts: batch ``batch`` (0-based, this rank) of ``epoch``."""
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"position (epoch {epoch}, batch {batch}) is outside 0..{len(self)} batches")
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[List[SampleKey]]:
        return self.keys(self.epoch, self.batch)

    def keys(self, epoch: int, start: int = 0) -> Iterator[List[SampleKey]]:
        """This rank's batches of ``epoch`` from batch ``start`` on, as sample keys."""
        for indices in self.rank_batches(epoch)[start:]:
            yield [(i, epoch) for i in indices]

    def endless(self) -> "EndlessBatches":
        """This rank's batches from the current position on, epoch after epoch, without end."""
        return EndlessBatches(self)

    def state_dict(self) -> Dict[str, Any]:
        """The position as plain data."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.set_position(int(state["epoch"]), int(state["batch"]))


class EndlessBatches:
    """A DataLoader ``batch_sampler`` that runs on from one epoch into the next.

    One DataLoader iterator then serves the whole run, so its workers' prefetched batches cross
    epoch boundaries: a new epoch no longer starts with the step waiting for its first batch to
    be decoded (with 20 images and batch 4, that was every fifth step).
    """

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)  # per epoch; the iteration itself never ends

    def __iter__(self) -> Iterator[List[SampleKey]]:
        epoch, start = self.sampler.epoch, self.sampler.batch
        while True:
            yield from self.sampler.keys(epoch, start)
            epoch, start = epoch + 1, 0
