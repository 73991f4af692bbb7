"""Resuming with a changed pipeline: which changes apply, which are refused.

A checkpoint stores the resolved pipeline it was trained with. On ``--resume`` the new pipeline
is compared key by key (dotted paths as ``hcp config`` prints them):

* **refused** — changes that would make the resumed run a different experiment or cannot be
  restored: ``seed``, anything under ``model`` except ``gradient_checkpointing``, the optimizer
  (type and its hyper-parameters except ``lr``), the scheduler type, the loss, EMA on/off, the
  data (sources, buckets, batch sizes) and every adapter setting except its learning rates
  (rank, layers, alpha, dropout, words...);
* **applied** — everything else, e.g. ``train.max_steps``, ``save_every``, ``log_every``,
  ``keep_checkpoints``, learning rates (``*.lr``), scheduler warm-up and floor, ``[sample]``,
  ``max_grad_norm``, ``data.*.num_workers``, and the folders of data, masks and custom words
  (``img_root``, ``att_mask``, ``emb_dir``: data moves between disks). The log lists each applied
  change.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

from ..errors import UserError

#: Keys (dotted, ``*`` = one level, ``**`` = any depth) a resume may not change.
REFUSED = (
    "seed", "model.**", "train.optimizer.**", "train.scheduler.type", "train.loss.**", "train.ema.enabled",
    "train.gradient_accumulation", "data.**", "<adapters>.**",
)
#: Exceptions to REFUSED: keys that apply. Folder paths may change: data moves between disks.
ALLOWED = ("model.gradient_checkpointing", "model.cache_text", "data.*.num_workers", "data.*.cache_dir", "**.lr",
           "data.**.img_root", "data.**.att_mask", "**.emb_dir")


class ResumeConfigError(UserError):
    """The pipeline changed in a way a resumed run cannot honour."""


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": [1, {"c": 2}]}}`` -> ``{"a.b[0]": 1, "a.b[1].c": 2}``; a list of scalars stays one value."""
    out: Dict[str, Any] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value
    return out


def _pattern(glob: str, adapter_sections: List[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(s) for s in adapter_sections) or "(?!)"
    text = re.escape(glob).replace(re.escape("<adapters>"), f"(?:{alternatives})(?:\\[\\d+\\])?")
    text = text.replace(r"\*\*", ".+").replace(r"\*", r"[^.\[\]]+")
    return re.compile(rf"^{text}(?:\[\d+\])?$")


def classify(old: Mapping[str, Any], new: Mapping[str, Any], adapter_sections: List[str]) -> Tuple[List[str], List[str]]:
    """(applied, refused) changes between two resolved pipelines, as ``key: old -> new`` lines."""
    a, b = flatten(old), flatten(new)
    refused_p = [_pattern(g, adapter_sections) for g in REFUSED]
    allowed_p = [_pattern(g, adapter_sections) for g in ALLOWED]
    applied: List[str] = []
    refused: List[str] = []
    for key in sorted(set(a) | set(b)):
        if key in ("exp_dir",) or a.get(key, _MISSING) == b.get(key, _MISSING):
            continue
        line = f"{key}: {_show(a.get(key, _MISSING))} -> {_show(b.get(key, _MISSING))}"
        blocked = any(p.match(key) for p in refused_p) and not any(p.match(key) for p in allowed_p)
        (refused if blocked else applied).append(line)
    return applied, refused


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


_MISSING = _Missing()


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, _Missing) else "(unset)"


def check_resume_config(old: Mapping[str, Any], new: Mapping[str, Any], adapter_sections: List[str], checkpoint: str) -> List[str]:
    """The applied changes; raises :class:`ResumeConfigError` listing every refused one."""
    applied, refused = classify(old, new, adapter_sections)
    if refused:
        raise ResumeConfigError(
            f"the pipeline changed since {checkpoint} in ways a resumed run cannot follow:\n  "
            + "\n  ".join(refused)
            + "\nRestore these values to resume, or start a new run in another exp_dir (learning rates, max_steps, "
            "save_every, [sample] and similar may change on resume; see docs/training.md)"
        )
    return applied
