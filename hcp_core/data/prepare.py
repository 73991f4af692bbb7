"""One ``[data.<name>]`` table made ready: sources scanned, records checked, buckets fitted.

No torch here: ``hcp check`` and the training run share this step; the run then wraps the
result in a torch dataset (:mod:`hcp_core.data.dataset`).

What a source's scan returns is checked here, the same way for every source, built-in or from a
plugin (:func:`check_records`): a template placeholder nothing fills is an error; an image without
a caption where a template wants one, and a mask that cannot be read or does not fit its image,
are reported as problems.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Tuple

import attrs

from ..config.schema import DatasetConfig
from ..errors import DataError
from ..interfaces import BucketContext, ImageRecord, Problem, Size, SourceContext
from ..registry import Registry
from .geometry import aspect_error, check_bucket_sizes
from .images import DEFAULT_MAX_PIXELS, BadImage, read_header, verify
from .prompts import CAPTION, check_templates, placeholders

#: The VAE's downsampling: bucket sides must be multiples of it (latents and masks divide evenly).
DEFAULT_LATENT_FACTOR = 8
#: Masks whose aspect ratio is within this of the image's are stretched to fit; others are ignored.
MASK_ASPECT_TOLERANCE = 0.01


class EmptyDatasetError(DataError):
    """No usable image is left in a dataset; ``problems`` says what was wrong with the files."""

    def __init__(self, message: str, problems: Sequence[Problem]) -> None:
        super().__init__(message)
        self.problems = list(problems)


@attrs.frozen
class BucketStats:
    """One row of the bucket table."""

    index: int
    size: Size
    images: int  # distinct image files
    samples: int  # images times their repeat: what one epoch trains on
    batches: int  # per epoch, before padding for several processes
    mean_aspect_error: float  # mean |r_image / r_bucket - 1| over the images (0.05 = 5%)


@attrs.define
class PreparedDataset:
    """A scanned and bucketed dataset: what the run and ``hcp check`` both need."""

    name: str
    config: DatasetConfig
    records: List[ImageRecord]
    problems: List[Problem]
    bucket: Any  # the built Bucket object
    bucket_sizes: List[Size]
    assignment: List[int]  # bucket index per record

    def stats(self) -> List[BucketStats]:
        """Per-bucket counts and aspect error, in bucket order."""
        n = len(self.bucket_sizes)
        images, samples, error = [0] * n, [0] * n, [0.0] * n
        for record, b in zip(self.records, self.assignment):
            images[b] += 1
            samples[b] += record.repeat
            error[b] += aspect_error(record.size, self.bucket_sizes[b])
        return [
            BucketStats(
                index=i,
                size=size,
                images=images[i],
                samples=samples[i],
                batches=math.ceil(samples[i] / self.config.batch_size),
                mean_aspect_error=error[i] / images[i] if images[i] else 0.0,
            )
            for i, size in enumerate(self.bucket_sizes)
        ]

    @property
    def num_samples(self) -> int:
        """Samples per epoch (images times repeat)."""
        return sum(r.repeat for r in self.records)


def verify_records(records: Sequence[ImageRecord], threads: Optional[int] = None) -> Tuple[List[ImageRecord], List[Problem]]:
    """Decode every image and mask fully; drop images that fail, ignore masks that fail.

    A header read cannot see a truncated file; this can (it is what ``hcp check`` runs).
    """

    def one(record: ImageRecord) -> Tuple[Optional[ImageRecord], List[Problem]]:
        try:
            verify(record.image)
        except (BadImage, OSError) as exc:
            return None, [Problem(record.image, str(exc), "skipped")]
        if record.mask is not None:
            try:
                verify(record.mask)
            except (BadImage, OSError) as exc:
                problem = Problem(record.mask, f"unusable mask for {record.image} ({exc})", "mask ignored: weight 1 everywhere")
                return attrs.evolve(record, mask=None), [problem]
        return record, []

    # PIL decodes without the GIL, so threads use every core.
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, records))
    kept = [r for r, _ in results if r is not None]
    problems = [p for _, ps in results for p in ps]
    return kept, problems


def scan_sources(name: str, config: DatasetConfig, *, registry: Registry, base_dir: str) -> Tuple[List[ImageRecord], List[Problem]]:
    """Build and scan every source of dataset ``name``, in order, and check what each returns
    (:func:`check_records`). ``registry`` is the pipeline's (``pipeline.registry``)."""
    records: List[ImageRecord] = []
    problems: List[Problem] = []
    context = SourceContext(registry=registry, base_dir=base_dir, dataset=name)
    for i, spec in enumerate(config.sources):
        scan = spec.build(context=context).scan()
        kept, more = check_records(scan.records, f"data.{name}.sources[{i}] ({spec.name})")
        records.extend(kept)
        problems.extend(scan.problems)
        problems.extend(more)
    return records, problems


def check_records(records: Sequence[ImageRecord], where: str) -> Tuple[List[ImageRecord], List[Problem]]:
    """The checks every source's records get; ``where`` names the source in messages.

    Raises :class:`~hcp_core.errors.ConfigError` for a template placeholder that no text
    transform fills (it would otherwise train as literal text) and :class:`DataError` for a
    record without templates or with ``repeat < 1``. Returns the records (a mask that cannot be
    used is dropped from its record: weight 1 everywhere) and the problems found.
    """
    checked: set = set()
    kept: List[ImageRecord] = []
    problems: List[Problem] = []
    for record in records:
        if not record.templates:
            raise DataError(f"{where}: {record.image} has no prompt template (the source gave none)")
        if record.repeat < 1:
            raise DataError(f"{where}: {record.image} has repeat {record.repeat}; it must be at least 1")
        # Records of one source share their templates and transforms: check each pair once.
        key = (record.templates, tuple(map(id, record.text_transforms)))
        if key not in checked:
            check_templates(record.templates, record.text_transforms, where)
            checked.add(key)
        if record.caption is None and any(CAPTION in placeholders(t) for t in record.templates):
            problems.append(Problem(record.image, "image has no caption", "trained with an empty {caption}"))
        if record.mask is not None:
            mask, problem = check_mask(record)
            if problem is not None:
                problems.append(problem)
            if mask != record.mask:
                record = attrs.evolve(record, mask=mask)
        kept.append(record)
    return kept, problems


def check_mask(record: ImageRecord) -> Tuple[Optional[str], Optional[Problem]]:
    """The mask ``record`` can use (None: weight 1 everywhere) and the problem with it, if any.

    A mask of the image's size is used as is; one of the same aspect ratio (within
    :data:`MASK_ASPECT_TOLERANCE`) is stretched; any other, or an unreadable one, is ignored.
    """
    assert record.mask is not None
    mask, (w, h) = str(record.mask), record.size
    try:
        # Only the header is read; a mask may be as large as its image even past PIL's default.
        mask_size = read_header(mask, max(DEFAULT_MAX_PIXELS, w * h)).size
    except (BadImage, OSError) as exc:
        return None, Problem(mask, f"unusable mask for {record.image} ({exc})", "mask ignored: weight 1 everywhere")
    if mask_size == (w, h):
        return mask, None
    mw, mh = mask_size
    what = f"mask size {mw}x{mh} differs from its image's {w}x{h} ({record.image})"
    if abs(math.log((mw / mh) / (w / h))) <= MASK_ASPECT_TOLERANCE:
        return mask, Problem(mask, what, "mask stretched to the image size")
    return None, Problem(mask, what + " and so does its aspect ratio", "mask ignored: weight 1 everywhere")


def prepare_dataset(
    name: str,
    config: DatasetConfig,
    *,
    registry: Registry,
    base_dir: str = ".",
    seed: int = 0,
    verify_images: bool = False,
    latent_factor: int = DEFAULT_LATENT_FACTOR,
    size_multiple: Optional[int] = None,
    select: Optional[Callable[[List[ImageRecord]], List[ImageRecord]]] = None,
) -> PreparedDataset:
    """Scan, check, optionally verify, and bucket dataset ``name``; ``registry`` is the
    pipeline's (``pipeline.registry``). Bucket sides must be multiples of ``size_multiple``
    (default ``latent_factor``; a transformer that patches 2x2 latents needs twice that).
    ``select`` picks the records to keep right after the scan (a validation split).

    Raises :class:`~hcp_core.errors.DataError` when nothing usable is left, naming the problems.
    """
    if not config.sources:
        known = ", ".join(registry.data_sources.names()) or "none is installed"
        raise DataError(f"data.{name}: no sources; add a [[data.{name}.sources]] table (data sources: {known})")
    records, problems = scan_sources(name, config, registry=registry, base_dir=base_dir)
    if select is not None and records:
        records = select(records)
    if verify_images and records:
        records, more = verify_records(records)
        problems.extend(more)
    if not records:
        detail = "".join(f"\n  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise EmptyDatasetError(f"data.{name}: no usable images in its sources.{detail}{more}", problems)
    bucket = config.bucket.build(context=BucketContext(seed=seed, dataset=name))
    try:
        sizes = check_bucket_sizes(bucket.fit([r.size for r in records]), size_multiple or latent_factor,
                                   f"data.{name}.bucket")
    except ValueError as exc:
        raise DataError(f"data.{name}.bucket ({config.bucket.name}): {exc}") from exc
    if not sizes:
        raise DataError(f"data.{name}.bucket ({config.bucket.name}) produced no bucket sizes")
    assignment = [bucket.assign(r.size, sizes) for r in records]
    bad = next((b for b in assignment if not 0 <= b < len(sizes)), None)
    if bad is not None:
        raise DataError(f"data.{name}.bucket ({config.bucket.name}) assigned an image to bucket {bad} of {len(sizes)}")
    return PreparedDataset(
        name=name,
        config=config,
        records=records,
        problems=problems,
        bucket=bucket,
        bucket_sizes=sizes,
        assignment=assignment,
    )
