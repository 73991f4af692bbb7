"""The UNet's conditioning for SD 1.x/2.x and SDXL: which prompt encoder a model needs, the
largest clip skip it allows, and the keyword arguments of a training step's UNet call.

SD 1.x/2.x: one text encoder's hidden states. What the SDXL UNet takes besides the noisy latents and the timestep:

* ``encoder_hidden_states``: both encoders' hidden states of the *same* layer depth, joined on
  the last axis (encoder 1 first). SDXL uses the penultimate layer's raw output (no final layer
  norm); hcp's ``model.clip_skip = N`` goes N layers further back on both encoders.
* ``added_cond_kwargs["text_embeds"]``: encoder 2's projected pooled output (the first chunk's,
  for long prompts), which clip skip does not change.
* ``added_cond_kwargs["time_ids"]``: per sample ``(orig_h, orig_w, crop_top, crop_left,
  target_h, target_w)``: the image's size before resizing, where the crop starts, and the size
  trained at (the bucket). The data pipeline records all three per sample.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from hcp_core.devices import to_device
from hcp_core.errors import ConfigError
from hcp_core.interfaces import ModelBundle
from hcp_core.models.text_encoding import EncodedPrompts, PromptEncoder, num_encoder_layers

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: SDXL conditions on the penultimate layer: hcp's clip_skip 0 is one layer back already.
SDXL_BASE_SKIP = 1
#: One tensor per SDXL text encoder.
TensorPair = Tuple["torch.Tensor", "torch.Tensor"]


def add_time_ids(original_size_hw: Any, crop_top_left: Any, target_size_hw: Any) -> "torch.Tensor":
    """SDXL's ``time_ids`` ``[B, 6]`` float32 from three ``[B, 2]`` (height/top first) tensors or lists."""
    import torch

    parts = [torch.as_tensor(x, dtype=torch.float32).reshape(-1, 2) for x in (original_size_hw, crop_top_left, target_size_hw)]
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"size/crop tensors disagree on the batch size: {[tuple(p.shape) for p in parts]}")
    return torch.cat(parts, dim=1)


def max_clip_skip(models: ModelBundle) -> int:
    """The largest ``clip_skip`` ``models`` allows: its text encoders' layers less one (on SDXL,
    less one more, since SDXL already conditions on the penultimate layer)."""
    if models.kind == "sdxl":
        layers = min(num_encoder_layers(models.text_encoder), num_encoder_layers(models.text_encoder_2))
        return layers - SDXL_BASE_SKIP - 1
    return num_encoder_layers(models.text_encoder) - 1


class SdxlPromptEncoder:
    """Prompts -> SDXL's text conditioning (``hidden`` [B, chunks*77, D1+D2], ``pooled`` [B, P]).

    Each encoder tokenizes with its own tokenizer (SDXL's second pads with "!"); a batch where one
    tokenizer needs more 77-token chunks than the other is padded with empty chunks so both
    hidden states line up. ``encoders`` are the two :class:`PromptEncoder` (wrappers such as
    prompt tuning's may replace them).
    """

    def __init__(self, models: ModelBundle, *, clip_skip: int = 0, max_chunks: int = 3) -> None:
        if models.text_encoder_2 is None or models.tokenizer_2 is None:
            raise ValueError("an SDXL prompt encoder needs text_encoder_2 and tokenizer_2")
        if not 0 <= clip_skip <= max_clip_skip(models):
            layers = max_clip_skip(models) + SDXL_BASE_SKIP + 1
            raise ConfigError(
                f"model.clip_skip = {clip_skip} is out of range for this SDXL model: its text encoders have "
                f"{layers} layers and SDXL already uses the penultimate one, so clip_skip must be between 0 and "
                f"{max_clip_skip(models)}."
            )
        self.clip_skip = clip_skip
        skip = clip_skip + SDXL_BASE_SKIP
        self.encoders = [
            PromptEncoder(models.tokenizer, models.text_encoder, clip_skip=skip, max_chunks=max_chunks, norm_after_skip=False),
            PromptEncoder(models.tokenizer_2, models.text_encoder_2, clip_skip=skip, max_chunks=max_chunks, norm_after_skip=False),
        ]

    @property
    def emphasis_parts(self) -> list:
        """The encoders ``(word:1.2)`` emphasis switches on (:func:`hcp_core.models.emphasis.enable_emphasis`)."""
        return self.encoders

    @property
    def uses(self) -> Optional[Dict[str, int]]:
        """How often each custom word was put into a prompt (encoder 1's count; both encoders see
        the same prompts), or None without custom words."""
        return getattr(self.encoders[0], "uses", None)

    def chunk_count(self, prompt: str) -> int:
        """Chunks ``prompt`` encodes to on its own: the larger of the two tokenizers' counts."""
        return max(encoder.chunk_count(prompt) for encoder in self.encoders)

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """Token ids of each encoder, padded to the same number of chunks."""
        (ids_1, ids_2), _ = self.tokenize_weighted(prompts)
        return ids_1, ids_2

    def tokenize_weighted(self, prompts: Union[str, Sequence[str]]) -> Tuple[TensorPair, TensorPair]:
        """((ids 1, ids 2), (weights 1, weights 2)): each encoder's ids and emphasis weights
        (:meth:`PromptEncoder.tokenize_weighted`), padded with empty chunks to the same length."""
        import torch

        tokenized = [encoder.tokenize_weighted(prompts) for encoder in self.encoders]
        chunks = max(i.shape[1] // e.chunk_length for (i, _), e in zip(tokenized, self.encoders))
        ids, weights = [], []
        for (i, w), encoder in zip(tokenized, self.encoders):
            missing = chunks - i.shape[1] // encoder.chunk_length
            if missing:
                empty = torch.tensor(encoder.chunk([], missing), dtype=torch.long).expand(i.shape[0], -1)
                i = torch.cat([i, empty], dim=1)
                w = torch.cat([w, torch.ones(w.shape[0], missing * encoder.chunk_length)], dim=1)
            ids.append(i)
            weights.append(w)
        return (ids[0], ids[1]), (weights[0], weights[1])

    def encode_with_pooled(self, ids_1: "torch.Tensor", ids_2: "torch.Tensor",
                           weights: Optional[TensorPair] = None) -> EncodedPrompts:
        """Encode both encoders' ids; hidden states joined on the last axis, pooled from encoder 2.
        ``weights`` (from :meth:`tokenize_weighted`) emphasise each encoder's hidden states on
        their own, before they are joined."""
        import torch

        w_1, w_2 = weights if weights is not None else (None, None)
        first = self.encoders[0].encode_with_pooled(ids_1, w_1)
        second = self.encoders[1].encode_with_pooled(ids_2, w_2)
        hidden = torch.cat([first.hidden, second.hidden.to(first.hidden.dtype)], dim=-1)
        return EncodedPrompts(hidden=hidden, pooled=second.pooled)

    def __call__(self, prompts: Union[str, Sequence[str]]) -> EncodedPrompts:
        """``encode_with_pooled(*tokenize(prompts))``, emphasised when its encoders' ``emphasis`` is on."""
        if any(encoder.emphasis for encoder in self.encoders):
            ids, weights = self.tokenize_weighted(prompts)
            return self.encode_with_pooled(*ids, weights=weights)
        return self.encode_with_pooled(*self.tokenize(prompts))


def make_prompt_encoder(models: ModelBundle, *, clip_skip: int = 0) -> Union[PromptEncoder, SdxlPromptEncoder]:
    """The prompt encoder the model needs: :class:`SdxlPromptEncoder` for SDXL, else :class:`PromptEncoder`."""
    if models.kind == "sdxl":
        return SdxlPromptEncoder(models, clip_skip=clip_skip)
    return PromptEncoder(models.tokenizer, models.text_encoder, clip_skip=clip_skip)


def unet_conditioning(prompt_encoder: Any, batch: Mapping[str, Any], device: Any = None) -> Dict[str, Any]:
    """Keyword arguments for ``unet(noisy, t, **kwargs)`` for a training batch.

    SD: ``encoder_hidden_states``. SDXL (an :class:`SdxlPromptEncoder`): also ``added_cond_kwargs``
    with the pooled embedding and the ``time_ids`` from the batch's ``original_size_hw``,
    ``crop_top_left`` and ``target_size_hw``.
    """
    encoded = prompt_encoder(batch["prompts"])
    if not isinstance(encoded, EncodedPrompts):
        return {"encoder_hidden_states": encoded}
    time_ids = add_time_ids(batch["original_size_hw"], batch["crop_top_left"], batch["target_size_hw"])
    return {
        "encoder_hidden_states": encoded.hidden,
        "added_cond_kwargs": {"text_embeds": encoded.pooled, "time_ids": to_device(time_ids, device or encoded.hidden.device)},
    }
