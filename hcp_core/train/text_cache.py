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

The encodings are also kept on disk, keyed like the latent cache, so a resumed or repeated run
encodes only prompts it has not seen: ``<exp_dir>/text_cache/<fingerprint>/<key[:2]>/<key>.safetensors``.
The fingerprint (:func:`text_fingerprint`) covers the text encoders' configs and weights (their
dtype, shapes and an evenly spaced sample of every tensor: a fine-tune changes nearly every
value), the tokenizers' vocabularies, the prompt encoder's settings (CLIP skip, lengths, ...) and
the mixed precision; the key is the prompt. The empty prompt is always encoded live: it gives the
structure stored rows are rebuilt into, and the padding chunk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence

import attrs
import torch

from ..data.prompts import build_prompt
from ..devices import to_device
from ..errors import ConfigError
from ..fileio import atomic_write

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


TEXT_CACHE_VERSION = 1
#: Values of each weight tensor the fingerprint reads (evenly spaced, first and last included).
_SAMPLES_PER_TENSOR = 4096


def _settings(obj: Any, depth: int = 0) -> Any:
    """The plain settings of a prompt encoder (and the encoders it holds), for the fingerprint."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_settings(x, depth + 1) for x in obj]
    if depth > 2 or isinstance(obj, (torch.nn.Module, torch.Tensor)) or hasattr(obj, "get_vocab"):
        return type(obj).__name__  # modules and tokenizers are fingerprinted by their contents
    fields = getattr(obj, "__dict__", None)
    if fields is None:
        return type(obj).__name__
    return {"type": type(obj).__name__,
            **{k: _settings(v, depth + 1) for k, v in sorted(fields.items()) if not k.startswith("_")}}


def _sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > _SAMPLES_PER_TENSOR:
        idx = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
        flat = flat[idx]
    return flat.float().cpu().numpy().tobytes()


def text_fingerprint(models: Any, encoder: Any, precision: str) -> str:
    """What cached prompt encodings depend on besides the prompt (see the module docstring)."""
    h = hashlib.sha256()
    head = {"v": TEXT_CACHE_VERSION, "encoder": _settings(encoder), "precision": precision}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(models, name, None)
        if tokenizer is not None:
            h.update(json.dumps([name, type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                                 tokenizer.model_max_length, str(tokenizer.pad_token)], default=str).encode())
    for name, module in sorted(models.modules().items()):
        if not name.startswith("text_encoder"):
            continue
        config = getattr(module, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        h.update(json.dumps([name, config], sort_keys=True, default=str).encode())
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(_sample(tensor))
    return h.hexdigest()[:24]


class TextStore:
    """Prompt encodings on disk: one safetensors file of a row's tensors per prompt."""

    def __init__(self, folder: str, *, write: bool = True) -> None:
        self.folder = folder
        self.write = write  # only the main process writes; every process reads

    def _path(self, prompt: str) -> str:
        key = hashlib.sha256(json.dumps({"v": TEXT_CACHE_VERSION, "prompt": prompt}).encode()).hexdigest()
        return os.path.join(self.folder, key[:2], f"{key}.safetensors")

    def load(self, prompt: str, like: Any) -> Any:
        """The stored row of ``prompt`` in the structure of ``like`` (a row), or None."""
        from safetensors.torch import load_file

        path = self._path(prompt)
        if not os.path.exists(path):
            return None
        try:
            tensors = load_file(path)
        except Exception:  # noqa: BLE001 - a damaged entry is encoded again
            return None
        if isinstance(like, torch.Tensor):
            return tensors.get("tensor")
        fields = _fields(like)
        if set(tensors) != {k for k, v in fields.items() if isinstance(v, torch.Tensor)}:
            return None
        return _rebuild(like, {**fields, **tensors})

    def save(self, prompt: str, row: Any) -> None:
        from safetensors.torch import save_file

        if not self.write:
            return
        tensors = {"tensor": row} if isinstance(row, torch.Tensor) else {
            k: v for k, v in _fields(row).items() if isinstance(v, torch.Tensor)}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        # Atomic (a crash or a second run never leaves half a file); not fsynced: a lost entry is
        # just encoded again.
        atomic_write(self._path(prompt), lambda tmp: save_file(tensors, tmp), durable=False)


class CachedPromptEncoder:
    """Stands in for a prompt encoder: returns stored outputs for the prompts it was built with.

    ``autocast`` (a context-manager factory, as the training loop's) is what the live encoder
    runs under in training, so the cached outputs are the ones it would compute.
    """

    def __init__(self, encoder: Any, prompts: Iterable[str], *, device: Any, batch_size: int = 8,
                 autocast: Optional[Callable[[], ContextManager]] = None, store: Optional[TextStore] = None) -> None:
        self.device = device
        self.rows: Dict[str, Any] = {}
        self.pad: Any = None  # the empty prompt's encoding, for encoders of chunked, varying length
        self.reused = 0  # rows read from ``store``
        chunk_count = getattr(encoder, "chunk_count", None)

        def cpu(row: Any) -> Any:
            return _map(row, lambda t: t.detach().to("cpu"))

        with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
            empty = cpu(_rows(encoder([""]))[0])  # the structure of a row, and the padding chunk
            if chunk_count is not None:
                self.pad = empty
            groups: Dict[int, List[str]] = {}
            for prompt in dict.fromkeys(prompts):
                row = store.load(prompt, empty) if store is not None else None
                if row is not None:
                    self.rows[prompt] = row
                    self.reused += 1
                else:
                    groups.setdefault(chunk_count(prompt) if chunk_count else 0, []).append(prompt)
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start:start + batch_size]
                    for prompt, row in zip(chunk, _rows(encoder(chunk))):
                        self.rows[prompt] = cpu(row)
                        if store is not None:
                            store.save(prompt, self.rows[prompt])

    def __call__(self, prompts: Any) -> Any:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise KeyError(f"prompt not in the text cache: {missing[0]!r}")
        return _stack([self.rows[p] for p in prompts], self.device, self.pad)


def cache_text(encoder: Any, models: Any, prepared: Mapping[str, Any], extra_prompts: Sequence[str], *,
               device: Any, autocast: Optional[Callable[[], ContextManager]] = None, root: Optional[str] = None,
               precision: str = "no", write: bool = True) -> CachedPromptEncoder:
    """Encode every training and ``extra_prompts`` prompt once (under ``autocast``, as training
    would), reusing and filling the disk cache under ``root`` (None: memory only; ``write``: this
    process writes new entries), then move the text encoders to the CPU."""
    prompts = fixed_prompts(prepared) + list(extra_prompts)
    store = None
    if root is not None:
        store = TextStore(os.path.join(root, text_fingerprint(models, encoder, precision)), write=write)
    cached = CachedPromptEncoder(encoder, prompts, device=device, autocast=autocast, store=store)
    for name, module in models.modules().items():
        if name.startswith("text_encoder"):
            module.to("cpu")
    where = f" ({cached.reused} reused from {store.folder})" if store is not None else ""
    log.info("text encoder outputs of %d prompts cached%s; the text encoders left the %s", len(cached.rows), where,
             getattr(device, "type", device))
    return cached
