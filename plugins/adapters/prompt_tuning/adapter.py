"""The ``prompt_tuning`` adapter: custom words from ``emb_dir`` in prompts, some of them trained.

Every word in ``[tokenizer_pt].emb_dir`` is installed into the text encoder (see
:mod:`hcp_core.models.custom_words`) and can be used by name in prompts; the words listed in
``train`` are Parameters with their own optimizer group and learning rate. Words not listed, and
the model's own token table, never change.

Words live in the model's CLIP text encoders only (:func:`parts_of`). On SDXL and SD3 every word
has one vector set per CLIP (``clip_l`` for encoder 1, ``clip_g`` for encoder 2, read from
``{clip_l, clip_g}`` files); a trained word trains both, in one optimizer group. On FLUX a word has
CLIP-L vectors only (SD 1.x's file layouts). T5 (FLUX, SD3) is never prompt-tuned: it reads the
word's name as plain text.

Exports: ``<exp_dir>/embeddings/<name>.pt`` (A1111 layout) and ``<name>.safetensors``
(``{name: tensor}``) at the end (SDXL, SD3: ``<name>.safetensors`` as ``{clip_l, clip_g}``, the
layout webui, ComfyUI and kohya read); ``<exp_dir>/embeddings/step-<N>/`` at each checkpoint, so any of
these folders can be used as an ``emb_dir`` as it is. With ``replace = true`` the final vectors are
also written back into the words' own files in ``emb_dir``.

DreamArtist (``[tokenizer_pt.dreamartist]``, SD and SDXL): the wrapped prompt encoder carries a
:class:`~hcp_core.train.diffusion.TrainingGuidance` whose negative prompts are the prompts with
each positive word swapped for its negative word; the model family then trains on the guided
prediction. Both words are ordinary trained words (checkpointed and exported as above).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from hcp_core.errors import ConfigError
from hcp_core.export_names import export_file_name
from hcp_core.interfaces import AdapterContext, ModelBundle
from hcp_core.models.custom_words import (
    SDXL_FILE_KEYS,
    CustomWords,
    EmbeddingFileError,
    embedding_files,
    install_word_sets,
    load_word_sets,
    parts_of,
    wrap_for_words,
    write_embedding,
)
from hcp_core.train.diffusion import TrainingGuidance

from .config import PromptTuningConfig, TrainedWord

log = logging.getLogger(__name__)

SECTION = "tokenizer_pt"
EXPORT_DIR = "embeddings"
EXPORT_SUFFIXES = (".pt", ".safetensors")
#: Two-CLIP words (SDXL, SD3) are exported as safetensors only: the layout every SDXL tool reads.
SDXL_EXPORT_SUFFIXES = (".safetensors",)
#: Model kinds whose family trains DreamArtist's guided prediction (plugins/models/stable_diffusion/).
GUIDED_KINDS = ("sd", "sdxl")


def export_folder(exp_dir: str | os.PathLike, step: Optional[int]) -> Path:
    """``<exp_dir>/embeddings`` for the final export, ``<exp_dir>/embeddings/step-<N>`` for checkpoints."""
    root = Path(exp_dir) / EXPORT_DIR
    return root if step is None else root / f"step-{step}"


class PromptTuningAdapter:
    """Built by the engine as ``PromptTuningAdapter(sections, context=...)``; see the module docstring."""

    #: Attach after the adapters that pick layers by name (fine-tune -10, LoRA 0), so none of
    #: their patterns can select the custom-word module this one installs.
    attach_order = 10

    def __init__(self, sections: Mapping[str, Sequence[PromptTuningConfig]], *, context: AdapterContext) -> None:
        configs = [cfg for group in sections.values() for cfg in group]
        if len(configs) != 1:
            raise ConfigError(f"{SECTION}: write one [{SECTION}] table (it lists every trained word), got {len(configs)}")
        self.config = configs[0]
        self.context = context
        emb_dir = Path(self.config.emb_dir).expanduser()
        self.emb_dir = emb_dir if emb_dir.is_absolute() else Path(context.base_dir) / emb_dir
        self.installed: Optional[Dict[str, CustomWords]] = None  # text encoder part -> its words
        self.parts: tuple = ()
        self.trained: Dict[str, TrainedWord] = {}  # installed word name -> its entry in train
        self.encoder: Optional[Any] = None  # the wrapped prompt encoder
        self._model_name: Optional[str] = None
        self.negative: Dict[str, str] = {}  # DreamArtist: positive word -> negative word (installed names)
        self._last_step = 0

    @property
    def words(self) -> Optional[CustomWords]:
        """The words installed in the (first) text encoder; None before :meth:`attach`."""
        return None if self.installed is None else self.installed[self.parts[0]]

    # ------------------------------------------------------------------ attach
    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
        """Install every word of ``emb_dir``; one optimizer group per trained word."""
        if self.installed is not None:
            raise RuntimeError("this prompt-tuning adapter is already attached")
        self._check_guided_kind(models)
        try:
            self.parts = parts_of(models)
        except EmbeddingFileError as exc:
            raise ConfigError(f"{SECTION}: {exc}") from None
        if not self.emb_dir.is_dir():
            raise ConfigError(
                f"{SECTION}.emb_dir: folder {self.emb_dir} does not exist; create custom words there with "
                f"'hcp tools create-embedding MODEL NAME N_TOKENS --out {self.config.emb_dir}'"
            )
        try:
            vectors = load_word_sets(self.emb_dir, self.parts)
        except EmbeddingFileError as exc:
            raise ConfigError(f"{SECTION}.emb_dir: {exc}") from None
        by_lower = {name.lower(): name for name in vectors}
        for i, word in enumerate(self.config.train):
            name = by_lower.get(word.name.lower())
            if name is None:
                found = ", ".join(sorted(vectors)) or "none (the folder has no .pt / .safetensors file)"
                raise ConfigError(
                    f"{SECTION}.train[{i}].name: no custom word '{word.name}' in {self.emb_dir}; words found: {found}"
                )
            self.trained[name] = word
        if not vectors:
            log.warning("%s.emb_dir: %s holds no custom words", SECTION, self.emb_dir)
        try:
            self.installed = install_word_sets(models, vectors, trainable=list(self.trained))
        except EmbeddingFileError as exc:
            raise ConfigError(f"{SECTION}.emb_dir {self.emb_dir}: {exc}") from None
        self._check_dreamartist(vectors)
        self._model_name = Path(models.source).name if models.source else None
        fixed = [n for n in vectors if n not in self.trained]
        first = self.installed[self.parts[0]]
        log.info("custom words from %s: trained %s; fixed %s", self.emb_dir,
                 ", ".join(f"{n} ({len(first.ids[n])} vectors, lr {w.lr:g})" for n, w in self.trained.items()) or "none",
                 ", ".join(fixed) or "none")  # fmt: skip
        return [
            {"params": list(self._word_params(name).values()), "lr": word.lr, "name": f"{SECTION}.{name}"}
            for name, word in self.trained.items()
        ]

    def wrap_prompt_encoder(self, encoder: Any) -> Any:
        """The run's prompt encoder, expanding the custom words into their placeholder tokens
        (in every CLIP part of a multi-encoder prompt encoder: SDXL's two, SD3's two, FLUX's one)."""
        if self.installed is None:
            raise RuntimeError("attach() first")
        self.encoder = wrap_for_words(encoder, self.installed)
        if self.negative:  # a fresh object of wrap_for_words: the family's own encoder is untouched
            da = self.config.dreamartist
            self.encoder.guidance = TrainingGuidance(self.negative_prompts, scale=da.cfg_scale,
                                                     scale_noisy=da.cfg_scale_noisy, curve=da.cfg_curve)
        return self.encoder

    # ------------------------------------------------------------------ DreamArtist
    def _check_guided_kind(self, models: ModelBundle) -> None:
        """DreamArtist needs a family that trains the guided prediction (before anything is installed)."""
        if self.config.dreamartist is not None and models.kind not in GUIDED_KINDS:
            why = ("FLUX.1 is guidance-distilled: it has no negative prompt to train" if models.kind == "flux" else
                   f"hcp trains the negative branch on SD 1.x/2.x and SDXL only, not on {models.kind}")
            raise ConfigError(f"{SECTION}.dreamartist: {why}; remove [{SECTION}.dreamartist] (plain prompt tuning works)")

    def _check_dreamartist(self, vectors: Mapping[str, Any]) -> None:
        """Resolve ``dreamartist.negative`` to installed words."""
        da = self.config.dreamartist
        if da is None:
            return
        by_lower = {name.lower(): name for name in vectors}
        found = ", ".join(sorted(vectors)) or "none"
        for positive, negative in da.negative.items():
            for word in (positive, negative):
                if word.lower() not in by_lower:
                    raise ConfigError(f"{SECTION}.dreamartist.negative: no custom word '{word}' in {self.emb_dir}; "
                                      f"words found: {found}. Create it with 'hcp tools create-embedding'.")
            self.negative[by_lower[positive.lower()]] = by_lower[negative.lower()]
        untrained = [w for pair in self.negative.items() for w in pair if w not in self.trained]
        if untrained:
            log.warning("%s.dreamartist: %s not in %s.train, so it stays fixed", SECTION, ", ".join(untrained), SECTION)

    def negative_prompts(self, prompts: List[str]) -> List[str]:
        """Each prompt with its positive words replaced by their negative words (found as the
        encoder finds words: whole, case-insensitively)."""
        words = self.words
        assert words is not None, "attach() first"
        return ["".join(self.negative.get(name, text) if name else text for text, name in words.split(prompt))
                for prompt in prompts]

    # ------------------------------------------------------------------ state
    def _word_params(self, name: str) -> Dict[str, torch.nn.Parameter]:
        """Text encoder part -> the word's Parameter in that encoder."""
        assert self.installed is not None, "attach() first"
        return {part: words.params[name] for part, words in self.installed.items()}

    def _state_key(self, name: str, part: str) -> str:
        """Checkpoint key of a word's vectors: the name, plus ``.clip_l`` / ``.clip_g`` on SDXL and SD3."""
        return name if len(self.parts) == 1 else f"{name}.{SDXL_FILE_KEYS[part]}"

    def _trained_params(self) -> Dict[str, torch.nn.Parameter]:
        return {self._state_key(name, part): p for name in self.trained for part, p in self._word_params(name).items()}

    def _export_vectors(self, name: str) -> Any:
        """What :func:`write_embedding` takes: one tensor, or part -> tensor on SDXL."""
        params = self._word_params(name)
        return params[self.parts[0]] if len(params) == 1 else dict(params)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """Word name (SDXL: ``name.clip_l`` and ``name.clip_g``) -> vectors ``[N, dim]``, for each trained word."""
        return {key: p.detach() for key, p in self._trained_params().items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the trained words' vectors from a checkpoint."""
        params = self._trained_params()
        missing = [name for name in params if name not in state]
        if missing:
            raise ConfigError(
                f"{SECTION}: the checkpoint has no vectors for trained word(s) {', '.join(missing)}; "
                f"it was made with another [{SECTION}].train list"
            )
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise ConfigError(f"{SECTION}: the checkpoint's '{name}' has shape {tuple(state[name].shape)}, "
                                      f"the word in {self.emb_dir} has {tuple(p.shape)}")  # fmt: skip
                p.copy_(state[name])

    # ------------------------------------------------------------------ export
    def export(self, models: ModelBundle, out_dir: str, step: Optional[int]) -> List[str]:
        """Write each trained word as ``.pt`` and ``.safetensors``; at the end, ``replace`` too."""
        if step is not None:
            self._last_step = step
        folder = export_folder(out_dir, step)
        suffixes = EXPORT_SUFFIXES if len(self.parts) == 1 else SDXL_EXPORT_SUFFIXES
        paths: List[str] = []
        for name in self.trained:
            for suffix in suffixes:
                # <word> or <output_name>-<word>: no step suffix, so a step-<N> folder keeps the trigger words
                file = export_file_name(self.context, name, None, tag=name, suffix=suffix)
                paths.append(str(write_embedding(folder / file, name, self._export_vectors(name),
                                                 step=self._last_step, model=self._model_name)))  # fmt: skip
        if step is None:
            self._warn_unused()
            if self.config.replace:
                paths += self._replace_sources()
        return paths

    def _replace_sources(self) -> List[str]:
        """Write the trained vectors over the words' own files in emb_dir (each in its own format)."""
        files = embedding_files(self.emb_dir)
        written: List[str] = []
        for name in self.trained:
            for file in files.get(name, []):
                write_embedding(file, name, self._export_vectors(name), step=self._last_step, model=self._model_name)
                written.append(str(file))
                log.info("replaced %s with the trained vectors of '%s'", file, name)
        return written

    def _warn_unused(self) -> None:
        if self.encoder is None:
            return
        for name in self.trained:
            if self.encoder.uses.get(name, 0) == 0:
                log.warning("trained word '%s' appeared in no prompt of this run, so it was not trained; "
                            "put it in a prompt_template or template_fill word_names", name)  # fmt: skip

