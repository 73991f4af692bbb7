"""Text-encoder outputs computed once (``model.cache_text = true``).

With frozen text encoders and prompts that never change, every prompt a run will use (each
sample's, and the ``[sample]`` prompts) is encoded once before training; the encoders then leave
the GPU (T5-XXL alone is ~9 GB in bf16). A family opts in with ``text_cache = True`` when stacking
cached rows gives exactly what encoding the batch would:

* outputs of a fixed shape per prompt (FLUX, SD3: T5 padded to a fixed length), or
* CLIP's 77-token chunks (SD, SDXL): the encoder offers ``chunk_count(prompt)``; prompts are
  encoded in groups of equal chunk count (so no row carries another prompt's padding), and a
  batch pads its shorter rows with the empty prompt's encoding, as the live encoder pads with
  empty chunks (each chunk is encoded on its own).

Prompts are fixed when building them draws no randomness: each record's prompt is built with a
random generator that refuses to be used; a random template choice or a random tag transform
makes caching impossible, and the run says which dataset is at fault.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence

import attrs
import torch

from ..data.prompts import build_prompt
from ..devices import to_device
from ..errors import ConfigError

log = logging.getLogger("hcp")


class _RandomUsed(Exception):
    pass


class _NoRandom(random.Random):
    """A generator that raises when anything draws from it."""

    def random(self) -> float:  # type: ignore[override]
        raise _RandomUsed

    def getrandbits(self, k: int) -> int:  # type: ignore[override]
        raise _RandomUsed


def fixed_prompts(prepared: Mapping[str, Any]) -> List[str]:
    """Every distinct training prompt of the prepared datasets; ConfigError if one is random."""
    out: Dict[str, None] = {}
    for name, dataset in prepared.items():
        for record in dataset.records:
            try:
                out[build_prompt(record, _NoRandom())] = None
            except _RandomUsed:
                raise ConfigError(
                    f"model.cache_text: the prompts of data.{name} change from epoch to epoch (several templates "
                    f"or a random text transform such as tag_shuffle, for {record.image}); encode them live "
                    "(cache_text = false) or make the prompts fixed"
                ) from None
    return list(out)


def _fields(obj: Any) -> Dict[str, Any]:
    """The fields of an encoder output: a mapping, an attrs instance or a dataclass."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if attrs.has(type(obj)):
        return attrs.asdict(obj, recurse=False)
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"cannot cache prompt encoder outputs of type {type(obj).__name__}")


def _rebuild(like: Any, fields: Dict[str, Any]) -> Any:
    if isinstance(like, Mapping):
        return fields
    return attrs.evolve(like, **fields) if attrs.has(type(like)) else dataclasses.replace(like, **fields)


def _map(obj: Any, fn: Any) -> Any:
    """``obj`` with ``fn`` applied to its tensors (obj a tensor or a structure of them)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return _rebuild(obj, {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in _fields(obj).items()})


def _rows(output: Any) -> List[Any]:
    """Split a batched encoder output (a tensor or a structure of [B, ...] tensors) into rows."""
    if isinstance(output, torch.Tensor):
        return list(output.unbind(0))
    n = next(v.shape[0] for v in _fields(output).values() if isinstance(v, torch.Tensor))
    return [_map(output, lambda t, i=i: t[i]) for i in range(n)]


def _padded(tensors: List[torch.Tensor], pad: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Rows of one field brought to the longest one's length (axis 0) with copies of ``pad``."""
    longest = max(t.shape[0] for t in tensors)
    if all(t.shape == tensors[0].shape for t in tensors):
        return tensors
    out = []
    for t in tensors:
        missing = longest - t.shape[0]
        if missing and (pad is None or missing % pad.shape[0] or t.shape[1:] != pad.shape[1:]):
            raise ValueError(f"cached prompt encodings of shapes {tuple(t.shape)} and {(longest, *t.shape[1:])} "
                             "cannot be batched: the encoder pads with no empty-prompt chunks")
        out.append(torch.cat([t, pad.repeat(missing // pad.shape[0], *[1] * (t.dim() - 1))]) if missing else t)
    return out


def _stack(rows: Sequence[Any], device: Any, pad: Any = None) -> Any:
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return to_device(torch.stack(_padded(list(rows), pad)), device)
    pads = _fields(pad) if pad is not None else {}
    fields = {k: (to_device(torch.stack(_padded([_fields(r)[k] for r in rows], pads.get(k))), device)
                  if isinstance(v, torch.Tensor) else v)
              for k, v in _fields(first).items()}
    return _rebuild(first, fields)


class CachedPromptEncoder:
    """Stands in for a prompt encoder: returns stored outputs for the prompts it was built with.

    ``autocast`` (a context-manager factory, as the training loop's) is what the live encoder
    runs under in training, so the cached outputs are the ones it would compute.
    """

    def __init__(self, encoder: Any, prompts: Iterable[str], *, device: Any, batch_size: int = 8,
                 autocast: Optional[Callable[[], ContextManager]] = None) -> None:
        self.device = device
        self.rows: Dict[str, Any] = {}
        self.pad: Any = None  # the empty prompt's encoding, for encoders of chunked, varying length
        unique = list(dict.fromkeys(prompts))
        chunk_count = getattr(encoder, "chunk_count", None)
        groups: Dict[int, List[str]] = {}
        for prompt in unique:
            groups.setdefault(chunk_count(prompt) if chunk_count else 0, []).append(prompt)
        with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start:start + batch_size]
                    for prompt, row in zip(chunk, _rows(encoder(chunk))):
                        self.rows[prompt] = _map(row, lambda t: t.detach().to("cpu"))
            if chunk_count is not None:
                self.pad = _map(_rows(encoder([""]))[0], lambda t: t.detach().to("cpu"))

    def __call__(self, prompts: Any) -> Any:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise KeyError(f"prompt not in the text cache: {missing[0]!r}")
        return _stack([self.rows[p] for p in prompts], self.device, self.pad)


def cache_text(encoder: Any, models: Any, prepared: Mapping[str, Any], extra_prompts: Sequence[str], *,
               device: Any, autocast: Optional[Callable[[], ContextManager]] = None) -> CachedPromptEncoder:
    """Encode every training and ``extra_prompts`` prompt once (under ``autocast``, as training
    would), then move the text encoders to the CPU."""
    prompts = fixed_prompts(prepared) + list(extra_prompts)
    cached = CachedPromptEncoder(encoder, prompts, device=device, autocast=autocast)
    for name, module in models.modules().items():
        if name.startswith("text_encoder"):
            module.to("cpu")
    log.info("text encoder outputs of %d prompts cached; the text encoders left the %s", len(cached.rows),
             getattr(device, "type", device))
    return cached
