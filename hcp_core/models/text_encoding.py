"""Prompt encoding shared by training, sampling and generation.

Two things differ from a plain ``text_encoder(tokenizer(prompt))``:

* **Long prompts** are encoded the way webui does: the prompt's tokens (without BOS/EOS) are cut
  into chunks of ``model_max_length - 2`` (75 for CLIP); each chunk is wrapped in BOS ... EOS,
  padded to 77 and encoded on its own, and the hidden states are joined along the sequence axis
  (a prompt of 2 chunks gives 154 positions). Prompts in one batch are padded to the same number
  of chunks with empty chunks (BOS, EOS, padding).
* **CLIP skip**: ``clip_skip = N`` takes the hidden state N layers before the last and passes it
  through the text encoder's final layer norm, as webui's "clip skip N+1" does; 0 is the plain
  output.

Tokenizing (:meth:`PromptEncoder.tokenize`) and encoding (:meth:`PromptEncoder.encode`) are separate
steps: prompt tuning overrides :meth:`PromptEncoder.token_ids` to expand its custom words into
placeholder tokens, and swaps vectors in at the embedding layer, without touching the chunking.

With :attr:`PromptEncoder.emphasis` on (``model.prompt_emphasis``), prompts are read with webui's
``(word:1.2)`` syntax (:mod:`.emphasis`): :meth:`PromptEncoder.tokenize_weighted` gives a weight
per position, and :meth:`PromptEncoder.encode_with_pooled` weights the hidden states with them.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

import attrs

from ..devices import to_device
from ..errors import ConfigError
from .emphasis import apply_emphasis, parse_emphasis

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: Where the final layer norm sits: ``CLIPTextModel`` on transformers 5 has no ``text_model.``
#: level; transformers 4 and ``CLIPTextModelWithProjection`` (SDXL's second encoder) have it.
_FINAL_NORM_PATHS = ("final_layer_norm", "text_model.final_layer_norm")


@attrs.frozen
class EncodedPrompts:
    """What :meth:`PromptEncoder.encode_with_pooled` returns."""

    hidden: "torch.Tensor"  # [B, chunks * 77, D]: the UNet's encoder_hidden_states
    #: [B, D'] the encoder's pooled output (projected for encoders with a projection) of each
    #: prompt's first chunk; SDXL conditions on it.
    pooled: "torch.Tensor"


def final_layer_norm(text_encoder: Any) -> Any:
    """The text encoder's final LayerNorm module, wherever its transformers version keeps it."""
    for path in _FINAL_NORM_PATHS:
        try:
            return text_encoder.get_submodule(path)
        except AttributeError:
            continue
    for name, module in text_encoder.named_modules():
        if name.endswith("final_layer_norm"):
            return module
    raise ValueError(f"{type(text_encoder).__name__} has no final_layer_norm; it is not a CLIP text encoder")


def num_encoder_layers(text_encoder: Any) -> int:
    """How many transformer layers the text encoder has (the most ``clip_skip`` can remove, less one)."""
    return int(text_encoder.config.num_hidden_layers)


class PromptEncoder:
    """Turn prompts into the UNet's text conditioning, in chunks of 77 tokens, with CLIP skip.

    ``max_chunks`` bounds the length: longer prompts are cut, with a warning that says how many
    tokens were dropped. Nothing here disables gradients, so a trained text encoder (or trained
    embeddings) gets them through :meth:`encode`.
    """

    #: Read ``(word:1.2)`` emphasis in prompts (:func:`~hcp_core.models.emphasis.enable_emphasis`);
    #: off, brackets are plain text.
    emphasis: bool = False

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        *,
        clip_skip: int = 0,
        max_chunks: int = 3,
        norm_after_skip: bool = True,
    ) -> None:
        """``norm_after_skip`` False keeps the skipped layer's raw output (SDXL's convention)."""
        layers = num_encoder_layers(text_encoder)
        if not 0 <= clip_skip < layers:
            raise ConfigError(
                f"model.clip_skip = {clip_skip} is out of range: this text encoder has {layers} layers, "
                f"so clip_skip must be between 0 and {layers - 1} (0 = no skip, webui's 'clip skip 1')."
            )
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.max_chunks = max_chunks
        self.norm_after_skip = norm_after_skip
        self.chunk_length = int(tokenizer.model_max_length)  # 77 for CLIP
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        # SD 1.x pads with EOS, SD 2.x's tokenizer with "!"; follow the tokenizer.
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id

    @property
    def tokens_per_chunk(self) -> int:
        """Prompt tokens one chunk holds: the window less BOS and EOS (75 for CLIP)."""
        return self.chunk_length - 2

    # ----------------------------------------------------------------------- tokenizing
    def token_ids(self, prompt: str) -> List[int]:
        """The prompt's token ids without BOS/EOS. Prompt tuning overrides this to expand its words."""
        return list(self.tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids)

    def weighted_token_ids(self, prompt: str) -> "tuple[List[int], List[float]]":
        """The prompt's token ids (as :meth:`token_ids`) and a weight per id. With :attr:`emphasis`
        each (text, weight) run of the parsed prompt is tokenized on its own; off, every weight is 1."""
        if not self.emphasis:
            ids = self.token_ids(prompt)
            return ids, [1.0] * len(ids)
        ids, weights = [], []
        for text, weight in parse_emphasis(prompt):
            piece = self.token_ids(text)
            ids += piece
            weights += [weight] * len(piece)
        return ids, weights

    def chunk_count(self, prompt: str) -> int:
        """How many 77-token chunks ``prompt`` encodes to in a batch of its own (at most
        ``max_chunks``); a batch pads to its longest prompt's count with empty chunks."""
        return self._chunks_for(len(self.weighted_token_ids(prompt)[0]))

    def _chunks_for(self, tokens: int) -> int:
        """Chunks that ``tokens`` prompt tokens fill: at least 1, at most ``max_chunks``."""
        return min(self.max_chunks, max(1, math.ceil(tokens / self.tokens_per_chunk)))

    def _windows(self, values: Sequence[Any], n_chunks: int, bos: Any, eos: Any, pad: Any) -> List[Any]:
        out: List[Any] = []
        step = self.tokens_per_chunk
        for i in range(n_chunks):
            window = [bos] + list(values[i * step : (i + 1) * step]) + [eos]
            out += window + [pad] * (self.chunk_length - len(window))
        return out

    def chunk(self, ids: Sequence[int], n_chunks: int) -> List[int]:
        """Lay ``ids`` (at most ``n_chunks`` * 75) out as ``n_chunks`` windows of BOS ids EOS pad..."""
        return self._windows(ids, n_chunks, self.bos_id, self.eos_id, self.pad_id)

    def chunk_weights(self, weights: Sequence[float], n_chunks: int) -> List[float]:
        """``weights`` laid out as :meth:`chunk` lays out their ids; BOS, EOS and padding weigh 1."""
        return self._windows(weights, n_chunks, 1.0, 1.0, 1.0)

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> "torch.Tensor":
        """Token ids ``[B, chunks * 77]`` for ``prompts``; the batch shares the largest chunk count."""
        return self.tokenize_weighted(prompts)[0]

    def tokenize_weighted(self, prompts: Union[str, Sequence[str]]) -> "tuple[torch.Tensor, torch.Tensor]":
        """Token ids ``[B, chunks * 77]`` and their weights (float32, same shape; all 1 without
        :attr:`emphasis`); the batch shares the largest chunk count."""
        import torch

        if isinstance(prompts, str):
            prompts = [prompts]
        limit = self.max_chunks * self.tokens_per_chunk
        all_ids, all_weights = [], []
        for prompt in prompts:
            ids, weights = self.weighted_token_ids(prompt)
            if len(ids) > limit:
                log.warning(
                    "prompt cut to %d tokens (max_chunks=%d x %d): %d tokens dropped, from %r",
                    limit, self.max_chunks, self.tokens_per_chunk, len(ids) - limit,
                    self.tokenizer.decode(ids[limit:]),
                )  # fmt: skip
                ids, weights = ids[:limit], weights[:limit]
            all_ids.append(ids)
            all_weights.append(weights)
        n_chunks = max([1, *(self._chunks_for(len(ids)) for ids in all_ids)])
        return (torch.tensor([self.chunk(ids, n_chunks) for ids in all_ids], dtype=torch.long),
                torch.tensor([self.chunk_weights(w, n_chunks) for w in all_weights], dtype=torch.float32))

    # ----------------------------------------------------------------------- encoding
    def encode_with_pooled(self, input_ids: "torch.Tensor", weights: "Optional[torch.Tensor]" = None) -> EncodedPrompts:
        """Encode ids from :meth:`tokenize`: every chunk in one batched pass, then rejoined; with
        ``weights`` (from :meth:`tokenize_weighted`) the hidden states are emphasised
        (:func:`~hcp_core.models.emphasis.apply_emphasis`; the pooled output is not)."""
        batch, length = input_ids.shape
        if length % self.chunk_length:
            raise ValueError(f"input_ids length {length} is not a multiple of {self.chunk_length}")
        n_chunks = length // self.chunk_length
        flat = to_device(input_ids.reshape(batch * n_chunks, self.chunk_length), self.text_encoder.device)
        out = self.text_encoder(input_ids=flat, output_hidden_states=self.clip_skip > 0)
        if self.clip_skip > 0:
            hidden = out.hidden_states[-(self.clip_skip + 1)]
            if self.norm_after_skip:
                hidden = final_layer_norm(self.text_encoder)(hidden)
        else:
            hidden = out.last_hidden_state
        pooled = getattr(out, "text_embeds", None)  # encoders with a projection (SDXL's second)
        if pooled is None:
            pooled = out.pooler_output
        hidden = hidden.reshape(batch, n_chunks * self.chunk_length, hidden.shape[-1])
        pooled = pooled.reshape(batch, n_chunks, pooled.shape[-1])[:, 0]
        if weights is not None and bool((weights != 1).any()):
            hidden = apply_emphasis(hidden, weights)
        return EncodedPrompts(hidden=hidden, pooled=pooled)

    def encode(self, input_ids: "torch.Tensor") -> "torch.Tensor":
        """Hidden states ``[B, chunks * 77, D]`` for ids from :meth:`tokenize`."""
        return self.encode_with_pooled(input_ids).hidden

    def __call__(self, prompts: Union[str, Sequence[str]]) -> "torch.Tensor":
        """``encode(tokenize(prompts))``, emphasised when :attr:`emphasis` is on."""
        if self.emphasis:
            return self.encode_with_pooled(*self.tokenize_weighted(prompts)).hidden
        return self.encode(self.tokenize(prompts))

