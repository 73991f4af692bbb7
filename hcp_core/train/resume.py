"""Resuming with a changed pipeline: which changes apply, which are refused.

A checkpoint stores the resolved pipeline it was trained with. On ``--resume`` the new pipeline
is compared key by key (dotted paths as ``hcp config`` prints them):

* **refused** — changes that would make the resumed run a different experiment or cannot be
  restored: ``seed``, anything under ``model`` except ``gradient_checkpointing`` and ``compile``, the optimizer
  (type and its hyper-parameters except ``lr``), the scheduler type, the loss, EMA on/off, the
  data (sources, buckets, batch sizes, the held-out ``validation.split``) and every adapter setting except its learning rates
  (rank, layers, alpha, dropout, words...);
* **applied** — everything else, e.g. ``train.max_steps``, ``train.epochs`` (and switching
  between the two), ``epoch_dataset``, ``save_every``, ``save_every_epochs``, ``log_every``,
  ``keep_checkpoints``, learning rates (``*.lr``), the scheduler's options (warm-up, floor, cycles...),
  ``train.trackers``, ``[sample]``,
  ``max_grad_norm``, ``data.*.num_workers``, and the folders of data, masks and custom words
  (``img_root``, ``att_mask``, ``emb_dir``: data moves between disks). The log lists each applied
  change. A change of the run's length (:data:`SCHEDULE_LENGTH_KEYS`) rebuilds the learning-rate
  schedule for the new length, as a changed ``max_steps`` always did.
"""
from __future__ import annotations

import re
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple

import attrs

from ..errors import UserError

#: Keys (dotted, ``*`` = one level, ``**`` = any depth) a resume may not change.
REFUSED = (
    "seed", "model.**", "train.optimizer.**", "train.scheduler.type", "train.loss.**", "train.ema.enabled",
    "train.gradient_accumulation", "data.**", "<adapters>.**",
    "validation.split.**",  # which images are held out decides what trains
)
#: Exceptions to REFUSED: keys that apply. Folder paths may change: data moves between disks.
ALLOWED = ("model.gradient_checkpointing", "model.cache_text", "model.allow_tf32", "model.vae_dtype", "model.vae_fp32", "model.compile", "model.compile.**", "data.*.num_workers", "data.*.cache_dir", "**.lr",
           "data.**.img_root", "data.**.att_mask", "**.emb_dir")


#: Keys that set how many steps the run trains: changing one on resume re-fits the lr schedule.
SCHEDULE_LENGTH_KEYS = ("train.max_steps", "train.epochs", "train.epoch_dataset")


#: Options every optimizer had before each got its own config class: checkpoints of then hold them
#: at these defaults whatever the optimizer, which is no change when the new config lacks them.
RETIRED_DEFAULTS = {"train.optimizer.momentum": 0.0, "train.optimizer.betas": [0.9, 0.999], "train.optimizer.eps": 1e-8}


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
        if key in RETIRED_DEFAULTS and key not in b and a.get(key) == RETIRED_DEFAULTS[key]:
            continue
        if key not in a and _is_default(key, b[key]):  # a key newer than the checkpoint, at its default
            continue
        line = f"{key}: {_show(a.get(key, _MISSING))} -> {_show(b.get(key, _MISSING))}"
        blocked = any(p.match(key) for p in refused_p) and not any(p.match(key) for p in allowed_p)
        (refused if blocked else applied).append(line)
    return applied, refused


_NO_DEFAULT = object()


def field_default(key: str, root: Optional[type] = None) -> Any:
    """The schema's default for a dotted pipeline key (``model.compile``, ``data.x.flip``), or
    ``_NO_DEFAULT`` where the schema does not fix one (adapter sections, plugin components)."""
    from ..config.schema import Pipeline

    kind: Any = root or Pipeline
    parts = [part for part in re.sub(r"\[\d+\]", "", key).split(".") if part]
    value: Any = _NO_DEFAULT
    while parts:
        origin = typing.get_origin(kind)
        if origin is typing.Union:  # Optional[X]
            kind = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)
            continue
        if origin in (dict, Dict):  # data.<name>: the key is a dataset name
            parts.pop(0)
            kind = typing.get_args(kind)[1]
            continue
        if origin in (list, List):
            kind = typing.get_args(kind)[0]
            continue
        if not attrs.has(kind):
            return _NO_DEFAULT
        field = attrs.fields_dict(attrs.resolve_types(kind)).get(parts.pop(0))
        if field is None:
            return _NO_DEFAULT
        default = field.default
        if default is attrs.NOTHING:
            value = _NO_DEFAULT
        elif isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            value = default.factory() if not default.takes_self else _NO_DEFAULT
        else:
            value = default
        kind = field.type
    return value


def _is_default(key: str, value: Any) -> bool:
    default = field_default(key)
    if default is _NO_DEFAULT or attrs.has(type(default)):
        return False
    return (list(default) if isinstance(default, tuple) else default) == value


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
