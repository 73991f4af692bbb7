"""The ``prompt_tuning`` adapter: custom words from ``emb_dir`` in prompts, some of them trained.

Every word in ``[tokenizer_pt].emb_dir`` is installed into the text encoder (see
:mod:`hcp_core.models.custom_words`) and can be used by name in prompts; the words listed in
``train`` are Parameters with their own optimizer group and learning rate. Words not listed, and
the model's own token table, never change.

Exports: ``<exp_dir>/embeddings/<name>.pt`` (A1111 layout) and ``<name>.safetensors``
(``{name: tensor}``) at the end; ``<exp_dir>/embeddings/step-<N>/`` at each checkpoint, so any of
these folders can be used as an ``emb_dir`` as it is. With ``replace = true`` the final vectors are
also written back into the words' own files in ``emb_dir``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from hcp_core.errors import ConfigError
from hcp_core.interfaces import AdapterContext, ModelBundle
from hcp_core.models.custom_words import (
    CustomWordPromptEncoder,
    CustomWords,
    EmbeddingFileError,
    embedding_files,
    install_custom_words,
    load_embeddings,
    write_embedding,
)
from hcp_core.models.text_encoding import PromptEncoder

from .config import PromptTuningConfig, TrainedWord

log = logging.getLogger(__name__)

SECTION = "tokenizer_pt"
EXPORT_DIR = "embeddings"
EXPORT_SUFFIXES = (".pt", ".safetensors")


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
        self.words: Optional[CustomWords] = None
        self.trained: Dict[str, TrainedWord] = {}  # installed word name -> its entry in train
        self.encoder: Optional[CustomWordPromptEncoder] = None
        self._model_name: Optional[str] = None
        self._last_step = 0

    # ------------------------------------------------------------------ attach
    def attach(self, models: ModelBundle) -> List[Dict[str, Any]]:
        """Install every word of ``emb_dir``; one optimizer group per trained word."""
        if self.words is not None:
            raise RuntimeError("this prompt-tuning adapter is already attached")
        if models.kind == "sdxl":
            raise ConfigError(
                f"{SECTION}: custom words are not supported on SDXL models yet (they need one vector set per "
                "text encoder); remove [tokenizer_pt] or train an SD 1.x/2.x model"
            )
        if not self.emb_dir.is_dir():
            raise ConfigError(
                f"{SECTION}.emb_dir: folder {self.emb_dir} does not exist; create custom words there with "
                f"'hcp tools create-embedding MODEL NAME N_TOKENS --out {self.config.emb_dir}'"
            )
        try:
            vectors = load_embeddings(self.emb_dir)
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
            self.words = install_custom_words(models.part("text_encoder"), vectors, trainable=list(self.trained))
        except EmbeddingFileError as exc:
            raise ConfigError(f"{SECTION}.emb_dir {self.emb_dir}: {exc}") from None
        self._model_name = Path(models.source).name if models.source else None
        fixed = [n for n in vectors if n not in self.trained]
        log.info("custom words from %s: trained %s; fixed %s", self.emb_dir,
                 ", ".join(f"{n} ({len(self.words.ids[n])} vectors, lr {w.lr:g})" for n, w in self.trained.items()) or "none",
                 ", ".join(fixed) or "none")  # fmt: skip
        params = self.words.params
        return [{"params": [params[name]], "lr": word.lr, "name": f"{SECTION}.{name}"} for name, word in self.trained.items()]

    def wrap_prompt_encoder(self, encoder: PromptEncoder) -> CustomWordPromptEncoder:
        """The run's prompt encoder, expanding the custom words into their placeholder tokens."""
        if self.words is None:
            raise RuntimeError("attach() first")
        self.encoder = CustomWordPromptEncoder.wrap(encoder, self.words)
        return self.encoder

    # ------------------------------------------------------------------ state
    def _trained_params(self) -> Dict[str, torch.nn.Parameter]:
        assert self.words is not None, "attach() first"
        params = self.words.params
        return {name: params[name] for name in self.trained}

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """Word name -> its vectors ``[N, dim]``, for each trained word."""
        return {name: p.detach() for name, p in self._trained_params().items()}

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
        paths: List[str] = []
        for name, p in self._trained_params().items():
            for suffix in EXPORT_SUFFIXES:
                paths.append(str(write_embedding(folder / f"{name}{suffix}", name, p, step=self._last_step,
                                                 model=self._model_name)))  # fmt: skip
        if step is None:
            self._warn_unused()
            if self.config.replace:
                paths += self._replace_sources()
        return paths

    def _replace_sources(self) -> List[str]:
        """Write the trained vectors over the words' own files in emb_dir (each in its own format)."""
        files = embedding_files(self.emb_dir)
        written: List[str] = []
        for name, p in self._trained_params().items():
            for file in files.get(name, []):
                write_embedding(file, name, p, step=self._last_step, model=self._model_name)
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

