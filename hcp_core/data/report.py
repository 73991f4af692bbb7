"""Text reports on datasets: the bucket table and the problem list (``hcp check`` and run logs)."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from ..errors import UserError
from ..interfaces import Problem
from .holdout import split_selector, validation_sources
from .prepare import DEFAULT_LATENT_FACTOR, EmptyDatasetError, PreparedDataset, prepare_dataset
from .size_checks import size_warnings

#: How many problems a training log lists before pointing at ``hcp check``.
LOG_PROBLEM_LIMIT = 20


def bucket_table(prepared: PreparedDataset) -> str:
    """The bucket table of one dataset: size, ratio, counts, batches and mean aspect error."""
    cfg = prepared.config
    stats = prepared.stats()
    header = (
        f"data.{prepared.name}: {len(prepared.records)} images, {prepared.num_samples} samples per epoch "
        f"(with repeats), bucket {cfg.bucket.name}, {len(stats)} bucket(s), batch_size {cfg.batch_size}, "
        f"{sum(s.batches for s in stats)} batches per epoch, loss_weight {cfg.loss_weight:g}"
    )
    rows = [("bucket", "size (WxH)", "ratio", "images", "samples", "batches", "mean aspect error")]
    for s in stats:
        w, h = s.size
        rows.append((str(s.index), f"{w}x{h}", f"{w / h:.3f}", str(s.images), str(s.samples), str(s.batches),
                     f"{100 * s.mean_aspect_error:.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [header]
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(widths[i + 2]) for i, c in enumerate(r[2:])]
        lines.append("  " + "  ".join(cells))
    lines += [f"  note: {n}" for n in bucket_notes(prepared)]
    return "\n".join(lines)


def bucket_notes(prepared: PreparedDataset) -> List[str]:
    """Remarks on the table: empty buckets, buckets smaller than a batch."""
    notes = [str(n) for n in getattr(prepared.bucket, "notes", [])]  # optional bucket remarks
    bs = prepared.config.batch_size
    for s in prepared.stats():
        w, h = s.size
        if s.samples == 0:
            notes.append(f"bucket {s.index} ({w}x{h}) has no images; it is never drawn")
        elif s.samples < bs:
            notes.append(
                f"bucket {s.index} ({w}x{h}) has {s.samples} sample(s), fewer than batch_size {bs}: "
                f"its batch repeats them"
            )
    return notes


def format_problems(problems: Sequence[Problem], limit: Optional[int] = None) -> str:
    """One line per problem ("path: what (action)"), sorted by path; ``limit`` shortens the list."""
    ordered = sorted(problems, key=lambda p: (p.path, p.what))
    shown = ordered if limit is None else ordered[:limit]
    lines = [f"  {p}" for p in shown]
    if len(ordered) > len(shown):
        lines.append(f"  ... and {len(ordered) - len(shown)} more (run `hcp check` to list them all)")
    return "\n".join(lines)


def problem_summary(name: str, problems: Sequence[Problem]) -> str:
    """The short form for training logs: counts, then the first problems."""
    skipped = sum(1 for p in problems if p.action == "skipped")
    return (
        f"data.{name}: {len(problems)} file problem(s), {skipped} image(s) skipped; training goes on with the rest:\n"
        + format_problems(problems, LOG_PROBLEM_LIMIT)
    )


def check_data(
    pipeline: Any,
    out: TextIO = sys.stdout,
    *,
    registry: Any = None,
    strict: bool = False,
    verify_images: bool = True,
    latent_factor: Optional[int] = None,
    size_multiple: Optional[int] = None,
    native_size: Optional[Tuple[int, int]] = None,
    prepared_out: Optional[Dict[str, PreparedDataset]] = None,
) -> bool:
    """The data part of ``hcp check``: per dataset the bucket table and every problem, then the
    ``[validation]`` images (held out of a training dataset, or datasets of their own).

    Images are decoded in full (a header cannot reveal a truncated file; the run verifies them
    too, so both see the same buckets) unless ``verify_images`` is False (headers only: fast, but
    truncated files go unnoticed). ``native_size`` (the model's (w, h) resolution) enables the
    warning on buckets far above it (:mod:`hcp_core.data.size_checks`). Returns False when a
    dataset cannot be trained at all, or, with ``strict``, when any file has a problem.
    ``prepared_out`` receives each training dataset as prepared (e.g. to work out ``train.epochs``).
    """
    ok = True
    registry = registry if registry is not None else getattr(pipeline, "registry", None)

    def prepare(label: str, name: str, config: Any, select: Any) -> Optional[PreparedDataset]:
        nonlocal ok
        try:
            return prepare_dataset(
                name, config, registry=registry, base_dir=pipeline.base_dir, seed=pipeline.seed,
                verify_images=verify_images, latent_factor=latent_factor or DEFAULT_LATENT_FACTOR, size_multiple=size_multiple,
                select=select,
            )  # fmt: skip
        except EmptyDatasetError as exc:
            print(f"{label}: ERROR: no usable images; {len(exc.problems)} problem(s):", file=out)
            print(format_problems(exc.problems), file=out)
        except UserError as exc:
            print(f"{label}: ERROR: {exc}", file=out)
        ok = False
        return None

    for name, config in pipeline.data.items():
        # The training side of a held-out split, as the run buckets it.
        prepared = prepare(f"data.{name}", name, config, split_selector(pipeline, name, held=False))
        if prepared is None:
            continue
        if prepared_out is not None:
            prepared_out[name] = prepared
        print(bucket_table(prepared), file=out)
        for warning in size_warnings(prepared, native_size):
            print(f"warning: {warning}", file=out)
        if prepared.problems:
            print(f"data.{name}: {len(prepared.problems)} problem(s):", file=out)
            print(format_problems(prepared.problems), file=out)
            ok = ok and not strict
        else:
            print(f"data.{name}: no problems found", file=out)
        if config.cache_latents and not prepared.bucket.deterministic:
            print(f"data.{name}: note: cache_latents needs crop = \"center\"; with random crops latents are not cached", file=out)
    for label, name, config, select in validation_sources(pipeline):  # what the run evaluates
        prepared = prepare(label, name, config, select)
        if prepared is None:
            continue
        print(f"{label}: {len(prepared.records)} image(s) in {len(prepared.stats())} bucket(s), "
              f"{len(prepared.problems)} problem(s)", file=out)
        if prepared.problems:
            print(format_problems(prepared.problems), file=out)
            ok = ok and not strict
    return ok
