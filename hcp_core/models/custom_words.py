"""Custom words (textual-inversion embeddings): their files, their vectors in a text encoder, and
prompts that use them.

A custom word is a name plus ``N`` token vectors ``[N, dim]``. Nothing here changes the tokenizer's
vocabulary or the text encoder's token table:

* :func:`install_custom_words` puts a :class:`CustomWordEmbedding` in place of the text encoder's
  token embedding module. It looks ids below the base vocabulary size up in the untouched base
  table (the very same ``weight`` Parameter, under the same state-dict name) and gives each word
  ``N`` *placeholder ids* after it (``base_vocab + k``), whose vectors it holds itself.
* :class:`CustomWordPromptEncoder` is a :class:`~hcp_core.models.text_encoding.PromptEncoder`
  whose :meth:`token_ids` puts a word's placeholder ids where its name appears in a prompt, so a
  word of ``N`` vectors takes ``N`` token positions and later tokens shift. A word never straddles
  two 75-token windows: when it does not fit in what is left of a window, the window is closed
  (EOS, then padding, as for a shorter prompt) and the word starts the next one, as webui does.

Names are matched **case-insensitively** (CLIP lowercases every prompt, so ``My-Cat`` and
``my-cat`` are the same text to the model) and as **whole words**: not directly after or before a
letter, digit, ``_`` or ``-`` (``my-cat`` does not match inside ``my-cat-toy``). When names
overlap, the longest wins.

Files (A1111 ``.pt``, ``.safetensors``, SDXL's ``{clip_l, clip_g}``) are read and written by
:mod:`hcp_core.models.custom_word_files`; its names are importable from here too.
:func:`install_word_sets` installs words into every CLIP text encoder of a model (both of SDXL's
or SD3's, each from its own vector set; FLUX's one CLIP-L; never a T5) and :func:`wrap_for_words`
wraps the prompt encoder to match.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import UserError
from .custom_word_files import (  # noqa: F401  (re-exported: the files API is importable from here)
    EMBEDDING_SUFFIXES,
    SD_PARTS,
    SDXL_FILE_KEYS,
    SDXL_PARTS,
    EmbeddingFileError,
    WordVectors,
    embedding_files,
    load_embeddings,
    load_word_sets,
    parts_of,
    read_embedding,
    read_word_file,
    write_embedding,
)
from .text_encoding import PromptEncoder

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the embedding module
class CustomWordVectors(nn.Module):
    """The vectors of the installed words, one Parameter ``[N_k, dim]`` per word, in id order.

    Marked as an adapter branch so layer selection (fine-tune, LoRA groups) never picks it up.
    """

    hcp_adapter_branch = True

    def __init__(self, words: Mapping[str, torch.Tensor], trainable: Iterable[str]) -> None:
        super().__init__()
        trained = set(trainable)
        self.names: List[str] = list(words)
        # Keys "0", "1", ...: word names may hold characters a module attribute cannot.
        self.vectors = nn.ParameterList(
            [nn.Parameter(words[n].detach().clone().float(), requires_grad=n in trained) for n in self.names]
        )

    def table(self, dtype: torch.dtype) -> torch.Tensor:
        """All words' vectors stacked ``[sum N_k, dim]`` in ``dtype``, in placeholder-id order.

        Under mixed precision trained words stay float32 while frozen ones are cast to half.
        """
        return torch.cat([v.to(dtype) for v in self.vectors], dim=0)


class CustomWordEmbedding(nn.Module):
    """A token embedding that also knows custom words (see the module docstring).

    ``weight`` is the base table's own Parameter, so the base table keeps its state-dict name and
    stays shared with anything that already holds it (a fine-tune group training it).
    """

    def __init__(self, base: nn.Embedding, words: Mapping[str, torch.Tensor], trainable: Iterable[str] = ()) -> None:
        super().__init__()
        self.weight = base.weight
        self.num_embeddings = int(base.num_embeddings)
        self.embedding_dim = int(base.embedding_dim)
        self.padding_idx = base.padding_idx
        self.max_norm, self.norm_type = base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.words = CustomWordVectors(words, trainable)
        self.num_custom = sum(int(p.shape[0]) for p in self.words.vectors)
        # Kept outside the module tree (no second registration of the weight) to put back on removal.
        object.__setattr__(self, "_original", base)

    @property
    def original(self) -> nn.Embedding:
        """The token embedding module this one replaced."""
        return self._original  # type: ignore[attr-defined]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        custom = input_ids >= self.num_embeddings
        base_ids = input_ids.masked_fill(custom, 0) if self.num_custom else input_ids
        out = nn.functional.embedding(base_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                      self.scale_grad_by_freq, self.sparse)  # fmt: skip
        if not self.num_custom or not bool(custom.any()):
            return out
        offsets = (input_ids - self.num_embeddings).clamp(min=0)
        if int(offsets.max()) >= self.num_custom:
            raise IndexError(f"token id {int(input_ids.max())} is past the {self.num_custom} custom-word ids")
        rows = self.words.table(out.dtype)[offsets]
        return torch.where(custom.unsqueeze(-1), rows, out)


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, attr, module)


class CustomWords:
    """Custom words installed in a text encoder: names, placeholder ids, vectors; :meth:`remove`.

    Returned by :func:`install_custom_words`; :class:`CustomWordPromptEncoder` uses it to put the
    words into prompts.
    """

    def __init__(self, text_encoder: nn.Module, path: str, module: CustomWordEmbedding) -> None:
        self.text_encoder = text_encoder
        self.path = path
        self.module = module
        self.ids: Dict[str, List[int]] = {}
        next_id = module.num_embeddings
        for name, vectors in zip(module.words.names, module.words.vectors):
            self.ids[name] = list(range(next_id, next_id + int(vectors.shape[0])))
            next_id += int(vectors.shape[0])
        self._by_lower = {name.lower(): name for name in self.ids}
        names = sorted(self.ids, key=len, reverse=True)  # the longest of overlapping names wins
        self._pattern = (
            re.compile(r"(?<![\w-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w-])", re.IGNORECASE)
            if names else None
        )  # fmt: skip

    @property
    def names(self) -> List[str]:
        """The words' names, in placeholder-id order."""
        return list(self.ids)

    @property
    def params(self) -> Dict[str, nn.Parameter]:
        """Name -> the word's Parameter ``[N, dim]`` (``requires_grad`` only for trained words)."""
        return dict(zip(self.module.words.names, self.module.words.vectors))

    def canonical(self, name: str) -> Optional[str]:
        """The installed word called ``name`` (case-insensitively), or None."""
        return self._by_lower.get(name.lower())

    def split(self, prompt: str) -> List[Tuple[str, Optional[str]]]:
        """``prompt`` as pieces ``(text, None)`` and ``(matched text, word name)``, in order."""
        if self._pattern is None:
            return [(prompt, None)]
        pieces: List[Tuple[str, Optional[str]]] = []
        pos = 0
        for m in self._pattern.finditer(prompt):
            if m.start() > pos:
                pieces.append((prompt[pos:m.start()], None))
            pieces.append((m.group(0), self._by_lower[m.group(0).lower()]))
            pos = m.end()
        if pos < len(prompt):
            pieces.append((prompt[pos:], None))
        return pieces

    def remove(self) -> None:
        """Put the original token embedding back (the words' vectors stay readable in :attr:`params`)."""
        if self.text_encoder.get_submodule(self.path) is self.module:
            _set_module(self.text_encoder, self.path, self.module.original)


def install_custom_words(
    text_encoder: nn.Module, words: Mapping[str, torch.Tensor], *, trainable: Iterable[str] = ()
) -> CustomWords:
    """Make ``words`` (name -> ``[N, dim]``) usable in ``text_encoder``'s input ids.

    The token embedding module (``text_encoder.get_input_embeddings()``) is replaced by a
    :class:`CustomWordEmbedding` registered at the same place, so the words' Parameters are part of
    the text encoder's module tree (``.to()``, ``.parameters()`` see them). Words named in
    ``trainable`` get ``requires_grad``; the others and the base table are left as they are.
    """
    base = text_encoder.get_input_embeddings()
    if isinstance(base, CustomWordEmbedding):
        raise UserError("this text encoder already has custom words installed; remove them first")
    if not isinstance(base, nn.Embedding):
        raise UserError(f"cannot add custom words: the text encoder's token embedding is a {type(base).__name__}, not nn.Embedding")
    trained = list(trainable)
    unknown = [n for n in trained if n not in words]
    if unknown:
        raise UserError(f"cannot train {', '.join(map(repr, unknown))}: no such custom word (have: {', '.join(words) or 'none'})")
    seen: Dict[str, str] = {}
    for name, vectors in words.items():
        if name.lower() in seen:
            raise UserError(f"custom words '{seen[name.lower()]}' and '{name}' differ only in case; prompts cannot tell them apart")
        seen[name.lower()] = name
        if vectors.dim() != 2 or vectors.shape[-1] != base.embedding_dim:
            raise EmbeddingFileError(
                f"custom word '{name}' has vectors of shape {tuple(vectors.shape)}, but this text encoder's token "
                f"vectors have size {base.embedding_dim}: the word was made for another model"
            )
    path = _module_path(text_encoder, base)
    module = CustomWordEmbedding(base, words, trained).to(device=base.weight.device)
    _set_module(text_encoder, path, module)
    return CustomWords(text_encoder, path, module)


# --------------------------------------------------------------------------- prompts
def is_single_token(tokenizer: Any, name: str) -> bool:
    """True when the tokenizer already reads ``name`` as one token of its own vocabulary."""
    return len(tokenizer(name, add_special_tokens=False).input_ids) == 1


class CustomWordPromptEncoder(PromptEncoder):
    """A :class:`PromptEncoder` whose prompts may use the custom words of ``words``.

    Plain text between the words is tokenized by ``plain`` (the encoder this one wraps, see
    :meth:`wrap`) or the tokenizer. :attr:`uses` counts how often each word was put into a prompt.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        words: CustomWords,
        *,
        clip_skip: int = 0,
        max_chunks: int = 3,
        norm_after_skip: bool = True,
        plain: Optional[PromptEncoder] = None,
    ) -> None:
        super().__init__(tokenizer, text_encoder, clip_skip=clip_skip, max_chunks=max_chunks, norm_after_skip=norm_after_skip)
        too_long = {n: len(ids) for n, ids in words.ids.items() if len(ids) > self.tokens_per_chunk}
        if too_long:
            name, n = next(iter(too_long.items()))
            raise EmbeddingFileError(
                f"custom word '{name}' has {n} vectors; at most {self.tokens_per_chunk} fit in one prompt window"
            )
        self.words = words
        self.plain = plain
        self.uses: Dict[str, int] = {name: 0 for name in words.ids}
        for name in words.ids:
            if is_single_token(tokenizer, name):
                log.warning("custom word '%s' is also a token of the tokenizer: in prompts it means the custom word", name)

    @classmethod
    def wrap(cls, encoder: PromptEncoder, words: CustomWords) -> "CustomWordPromptEncoder":
        """An encoder with ``encoder``'s settings that expands ``words``; plain text still goes
        through ``encoder.token_ids``."""
        return cls(encoder.tokenizer, encoder.text_encoder, words, clip_skip=encoder.clip_skip,
                   max_chunks=encoder.max_chunks, norm_after_skip=encoder.norm_after_skip, plain=encoder)  # fmt: skip

    def _plain_ids(self, text: str) -> List[int]:
        if self.plain is not None:
            return self.plain.token_ids(text)
        return super().token_ids(text)

    def window_break(self, room: int) -> List[int]:
        """Ids that close the current window with ``room`` free positions: EOS, then padding."""
        return ([self.eos_id] + [self.pad_id] * (room - 1)) if room else []

    def token_ids(self, prompt: str) -> List[int]:
        """Prompt ids without BOS/EOS; each custom word becomes its placeholder ids, whole in one window."""
        ids: List[int] = []
        for text, name in self.words.split(prompt):
            if name is None:
                if text.strip():
                    ids += self._plain_ids(text)
                continue
            word = self.words.ids[name]
            room = self.tokens_per_chunk - len(ids) % self.tokens_per_chunk
            if len(word) > room:
                ids += self.window_break(room)
            ids += word
            self.uses[name] += 1
        return ids


# --------------------------------------------------------------------------- whole models
def install_word_sets(
    models: Any, words: Mapping[str, WordVectors], *, trainable: Iterable[str] = ()
) -> Dict[str, CustomWords]:
    """Install ``words`` (name -> part -> ``[N, dim]``) into every text encoder of ``models``.

    The parts are ``models``' CLIP text encoders (:func:`parts_of`): SD models have one (part
    ``text_encoder``), SDXL two (each gets its own vectors: ``clip_l`` and ``clip_g``); a model
    that also has a T5 (FLUX: CLIP-L + T5; SD3: CLIP-L + CLIP-G + T5) gets words in its CLIPs only.
    A word must have the same ``N`` for every encoder, since it takes ``N`` prompt positions in
    each. Returns part -> :class:`CustomWords`.
    """
    parts = parts_of(models)
    for name, sets in words.items():
        missing = [p for p in parts if p not in sets]
        if missing:
            raise EmbeddingFileError(f"custom word '{name}' has no vectors for {', '.join(missing)}")
        rows = {p: int(sets[p].shape[0]) for p in parts}
        if len(set(rows.values())) != 1:
            raise EmbeddingFileError(f"custom word '{name}' has a different number of vectors per text encoder: {rows}")
    trained = list(trainable)
    return {
        part: install_custom_words(models.part(part), {n: sets[part] for n, sets in words.items()}, trainable=trained)
        for part in parts
    }


def wrap_for_words(encoder: Any, installed: Mapping[str, CustomWords]) -> Any:
    """A prompt encoder like ``encoder`` that expands the words of ``installed`` (from
    :func:`install_word_sets`).

    A plain :class:`PromptEncoder` becomes a :class:`CustomWordPromptEncoder`. A prompt encoder
    made of several parts (SDXL's, or a family's that also runs T5) exposes its CLIP parts as
    ``encoders``: a list of :class:`PromptEncoder`, one per installed part in part order (see
    :func:`parts_of`); the result is a shallow copy whose ``encoders`` are each wrapped with their
    own words. Everything else such an encoder does (T5) sees the prompt text as it is.
    """
    inner = getattr(encoder, "encoders", None)
    if inner is None:
        return CustomWordPromptEncoder.wrap(encoder, installed[SD_PARTS[0]])
    parts = list(installed)
    if len(inner) != len(parts):
        raise ValueError(f"{type(encoder).__name__} has {len(inner)} CLIP prompt encoder(s) but custom words are "
                         f"installed in {len(parts)} text encoder(s) ({', '.join(parts)})")
    wrapped = copy.copy(encoder)
    wrapped.encoders = [CustomWordPromptEncoder.wrap(e, installed[part]) for e, part in zip(inner, parts)]
    return wrapped
