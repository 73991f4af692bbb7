"""Held-out validation images: which images of a training dataset ``[validation.split.<name>]``
keeps out of training.

The choice is a pure function of (seed, dataset name, image file names): each image gets a rank
from a hash of those, and the lowest ranks are held out. So it does not depend on the order a
source lists files in, stays the same when the data moves to another disk, and adding an image
moves at most one image between the two sides.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import attrs

from ..errors import DataError
from ..interfaces import ImageRecord


def holdout_count(total: int, *, fraction: Optional[float] = None, count: Optional[int] = None) -> int:
    """How many of ``total`` images are held out: ``count``, or ``fraction`` of them rounded (at least 1)."""
    if count is not None:
        return count
    assert fraction is not None, "set fraction or count"
    return max(1, round(fraction * total))


def _rank(seed: int, dataset: str, image: str) -> str:
    return hashlib.sha256(f"hcp-holdout:{seed}:{dataset}:{os.path.basename(image)}".encode()).hexdigest()


def split_records(records: Sequence[ImageRecord], *, seed: int, dataset: str, fraction: Optional[float] = None,
                  count: Optional[int] = None) -> Tuple[List[ImageRecord], List[ImageRecord]]:
    """(training records, held-out records), both in their original order.

    Held-out records get ``repeat = 1`` (validation looks at each image once). Raises
    :class:`~hcp_core.errors.DataError` when nothing would be left to train on.
    """
    k = holdout_count(len(records), fraction=fraction, count=count)
    if k >= len(records):
        raise DataError(f"validation.split.{dataset}: holds out {k} of the {len(records)} images of data.{dataset}, "
                        "leaving none to train on; lower fraction/count or add images")
    order = sorted(range(len(records)), key=lambda i: (_rank(seed, dataset, records[i].image), i))
    held = set(order[:k])
    train = [r for i, r in enumerate(records) if i not in held]
    out = [attrs.evolve(r, repeat=1) for i, r in enumerate(records) if i in held]
    return train, out


def split_selector(pipeline: Any, name: str, *, held: bool) -> Optional[Callable[[List[ImageRecord]], List[ImageRecord]]]:
    """For ``prepare_dataset(select=...)``: keep dataset ``name``'s training side (``held`` False)
    or its held-out side (True) of ``pipeline.validation.split``; None when it has no split."""
    validation = getattr(pipeline, "validation", None)
    spec = validation.split.get(name) if validation is not None else None
    if spec is None:
        return None

    def select(records: List[ImageRecord]) -> List[ImageRecord]:
        sides = split_records(records, seed=pipeline.seed, dataset=name, fraction=spec.fraction, count=spec.count)
        return sides[1] if held else sides[0]

    return select


def validation_sources(pipeline: Any) -> List[Tuple[str, str, Any, Optional[Callable[[List[ImageRecord]], List[ImageRecord]]]]]:
    """``(key, name, dataset config, select)`` of every validation dataset of ``pipeline`` (none
    without ``[validation]``): each held-out split (``validation.split.<name>``, the held side of
    ``data.<name>``), then each dataset of its own (``validation.data.<name>``, ``select`` None)."""
    validation = getattr(pipeline, "validation", None)
    if validation is None:
        return []
    held = [(f"validation.split.{name}", name, pipeline.data[name], split_selector(pipeline, name, held=True))
            for name in validation.split]
    return held + [(f"validation.data.{name}", name, config, None) for name, config in validation.data.items()]
