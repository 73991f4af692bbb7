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
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, List, Sequence, Union

import attrs

from ..errors import ConfigError

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

    def chunk(self, ids: Sequence[int], n_chunks: int) -> List[int]:
        """Lay ``ids`` (at most ``n_chunks`` * 75) out as ``n_chunks`` windows of BOS ids EOS pad..."""
        out: List[int] = []
        step = self.tokens_per_chunk
        for i in range(n_chunks):
            piece = list(ids[i * step : (i + 1) * step])
            window = [self.bos_id] + piece + [self.eos_id]
            out += window + [self.pad_id] * (self.chunk_length - len(window))
        return out

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> "torch.Tensor":
        """Token ids ``[B, chunks * 77]`` for ``prompts``; the batch shares the largest chunk count."""
        import torch

        if isinstance(prompts, str):
            prompts = [prompts]
        limit = self.max_chunks * self.tokens_per_chunk
        all_ids = []
        for prompt in prompts:
            ids = self.token_ids(prompt)
            if len(ids) > limit:
                log.warning(
                    "prompt cut to %d tokens (max_chunks=%d x %d): %d tokens dropped, from %r",
                    limit, self.max_chunks, self.tokens_per_chunk, len(ids) - limit,
                    self.tokenizer.decode(ids[limit:]),
                )  # fmt: skip
                ids = ids[:limit]
            all_ids.append(ids)
        n_chunks = max([1] + [math.ceil(len(ids) / self.tokens_per_chunk) for ids in all_ids])
        return torch.tensor([self.chunk(ids, n_chunks) for ids in all_ids], dtype=torch.long)

    # ----------------------------------------------------------------------- encoding
    def encode_with_pooled(self, input_ids: "torch.Tensor") -> EncodedPrompts:
        """Encode ids from :meth:`tokenize`: every chunk in one batched pass, then rejoined."""
        batch, length = input_ids.shape
        if length % self.chunk_length:
            raise ValueError(f"input_ids length {length} is not a multiple of {self.chunk_length}")
        n_chunks = length // self.chunk_length
        flat = input_ids.reshape(batch * n_chunks, self.chunk_length).to(self.text_encoder.device)
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
        return EncodedPrompts(hidden=hidden, pooled=pooled)

    def encode(self, input_ids: "torch.Tensor") -> "torch.Tensor":
        """Hidden states ``[B, chunks * 77, D]`` for ids from :meth:`tokenize`."""
        return self.encode_with_pooled(input_ids).hidden

    def __call__(self, prompts: Union[str, Sequence[str]]) -> "torch.Tensor":
        """``encode(tokenize(prompts))``."""
        return self.encode(self.tokenize(prompts))

