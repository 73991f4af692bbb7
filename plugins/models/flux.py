"""The FLUX.1 family (``flux``): dev-style (guidance-distilled) and schnell-style models.

* **Parts** (diffusers naming): ``transformer`` (``FluxTransformer2DModel``), ``text_encoder``
  (CLIP-L: only its pooled output is used), ``text_encoder_2`` (T5: its hidden states are the
  transformer's text tokens), a 16-channel ``vae`` and a flow-matching Euler ``scheduler``.
* **Prompts**: :class:`FluxPromptEncoder` computes exactly what ``FluxPipeline.encode_prompt``
  does: CLIP padded/truncated to 77 tokens -> ``pooler_output``; T5 padded/truncated to
  ``max_sequence_length`` -> last hidden states. No 75-token chunks, no clip skip.
* **Objective**: rectified flow (:mod:`.flow_matching`): per sample a noise level sigma from the
  configured density and shift, ``x_t = (1 - sigma) x0 + sigma noise``, the transformer (fed the
  2x2-packed ``x_t``, sigma as its timestep, position ids and, for dev-style models, the
  ``guidance`` scale) predicts the velocity ``noise - x0``; optional SD3-style loss weights.
  Everything random comes from generators keyed on (seed, step, sample id).
* **Images**: diffusers' ``FluxPipeline`` around the bundle's modules, with the prompt embeddings
  from the run's (possibly wrapped) prompt encoder.

Local diffusers folders load, and single-file FLUX transformer checkpoints with ``model.config``
naming the diffusers folder that supplies the other parts (see :class:`.flow_common.FlowMatchingFamily`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Union

import attrs
import torch

from hcp_core.devices import to_device
from hcp_core.errors import ConfigError
from hcp_core.interfaces import ModelBundle
from hcp_core.models.text_encoding import PromptEncoder

from . import flow_matching as fm
from .config import DYNAMIC_SHIFT, FluxConfig
from .default_layers import FLUX as DEFAULT_LAYERS
from .flow_common import FlowMatchingFamily, FlowModelSpec, TwoStepPromptEncoder, read_index
from .flow_common import t5_hidden_states, tokenize_to_length, tokenizer_class

#: Folder parts of a FLUX.1 diffusers model, all required.
FLUX_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
#: Parts that are torch modules (frozen after loading).
MODULE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


# --------------------------------------------------------------------------- prompt encoding
@attrs.frozen
class FluxPrompts:
    """What :class:`FluxPromptEncoder` returns for a batch of prompts."""

    hidden: torch.Tensor  # [B, max_sequence_length, d_t5]: the transformer's encoder_hidden_states
    pooled: torch.Tensor  # [B, d_clip]: CLIP's pooled output, the transformer's pooled_projections


class FluxPromptEncoder(TwoStepPromptEncoder):
    """Prompts -> FLUX text conditioning, as ``FluxPipeline.encode_prompt`` computes it.

    :meth:`tokenize` and :meth:`encode` are separate steps (like hcp's ``PromptEncoder``) so that
    wrappers can change the token ids; nothing here disables gradients, so trained text-encoder
    weights (and custom-word vectors) get them through :meth:`encode`. CLIP is tokenized by
    ``encoders[0]``, an hcp :class:`PromptEncoder` of one 77-token window (the same ids as the
    pipeline's padded, truncated tokenization); prompt tuning swaps it for one that expands custom
    words. T5 always tokenizes the prompt as written (a custom word's name is plain text to it).
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any, *,
                 max_sequence_length: int = 512) -> None:
        self.tokenizer = tokenizer  # CLIP
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2  # T5
        self.text_encoder_2 = text_encoder_2
        self.max_sequence_length = int(max_sequence_length)
        #: FluxPipeline's ``tokenizer_max_length``: the CLIP tokenizer's model_max_length (77).
        self.clip_length = int(tokenizer.model_max_length) if tokenizer is not None else 77
        #: CLIP-L as a one-window hcp PromptEncoder (prompt tuning wraps it; see TwoStepPromptEncoder).
        self.encoders = [] if tokenizer is None or text_encoder is None else [
            PromptEncoder(tokenizer, text_encoder, max_chunks=1, norm_after_skip=False)]

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Dict[str, torch.Tensor]:
        """``{"clip": [B, 77], "t5": [B, max_sequence_length]}`` token ids, padded and truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        clip = (self.encoders[0].tokenize(prompts) if self.encoders
                else tokenize_to_length(self.tokenizer, prompts, self.clip_length, "CLIP"))
        t5 = tokenize_to_length(self.tokenizer_2, prompts, self.max_sequence_length, "T5")
        return {"clip": clip, "t5": t5}

    def encode(self, ids: Mapping[str, torch.Tensor]) -> FluxPrompts:
        """Hidden states (T5) and pooled output (CLIP) for ids from :meth:`tokenize`."""
        clip = self.text_encoder(to_device(ids["clip"], self.text_encoder.device), output_hidden_states=False)
        pooled = clip.pooler_output.to(dtype=self.text_encoder.dtype)
        hidden = t5_hidden_states(self.text_encoder_2, ids["t5"])
        return FluxPrompts(hidden=hidden, pooled=pooled)


# --------------------------------------------------------------------------- the family
class FluxFamily(FlowMatchingFamily):
    """FLUX.1: loading, T5 + pooled-CLIP prompts, the flow-matching objective, FluxPipeline images."""

    config_class = FluxConfig
    spec = FlowModelSpec(label="FLUX", kind="flux", folder_parts=FLUX_PARTS, module_parts=MODULE_PARTS,
                         pipeline_class="FluxPipeline", example_source="black-forest-labs/FLUX.1-dev")
    #: Model parts adapters may target ([[transformer]], [[lora_transformer]], [[text_encoder]], ...).
    parts = ("transformer", "text_encoder", "text_encoder_2")
    #: What [[lora_*]] groups without ``layers`` target (attention and MLP layers, :mod:`.default_layers`).
    default_layer_patterns = DEFAULT_LAYERS

    def part_classes(self, path: Path) -> Dict[str, Any]:
        """Part name -> the class that loads it (the T5 tokenizer as ``model_index.json`` names it)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

        return {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel,
                "tokenizer_2": tokenizer_class(read_index(path), "tokenizer_2"),
                "scheduler": FlowMatchEulerDiscreteScheduler}  # fmt: skip

    def patch_size(self, models: ModelBundle) -> int:
        """FLUX packs 2x2 latent patches outside the transformer (whose own patch size is 1)."""
        return 2

    # ------------------------------------------------------------------ prompts
    def refuse_clip_skip(self, clip_skip: int) -> None:
        """Any ``clip_skip`` but 0: FLUX reads only CLIP's pooled output."""
        if clip_skip:
            raise ConfigError(
                f"model.clip_skip = {clip_skip} does not apply to FLUX: it uses only CLIP's pooled output (and T5's "
                "last hidden states), as FluxPipeline does; leave model.clip_skip out or set it to 0."
            )

    def prompt_encoder(self, models: ModelBundle, *, clip_skip: int = 0) -> FluxPromptEncoder:
        """:class:`FluxPromptEncoder` (T5 hidden states + CLIP pooled output); ``clip_skip`` must be 0."""
        self.refuse_clip_skip(clip_skip)
        return FluxPromptEncoder(models.tokenizer, models.text_encoder, models.tokenizer_2, models.text_encoder_2,
                                 max_sequence_length=self.config.max_sequence_length)

    # ------------------------------------------------------------------ the objective
    def shift_for(self, models: ModelBundle, latent_height: int, latent_width: int) -> float:
        """The static time shift for latents of this size: the configured number, or for "dynamic"
        ``exp(mu)`` with FLUX's ``mu`` for the packed token count (the scheduler config's
        base/max shift and sequence lengths; FLUX.1's are kohya's flux_shift constants)."""
        shift = self.config.shift
        if shift != DYNAMIC_SHIFT:
            return float(shift)
        sched = getattr(models.scheduler, "config", {}) or {}
        get = sched.get if hasattr(sched, "get") else (lambda key, default: default)
        mu = fm.flux_shift(
            (latent_height // 2) * (latent_width // 2),
            base_seq_len=get("base_image_seq_len", 256), max_seq_len=get("max_image_seq_len", 4096),
            base_shift=get("base_shift", 0.5), max_shift=get("max_shift", 1.15),
        )  # fmt: skip
        return math.exp(mu)

    def unpack_prediction(self, pred: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The transformer's packed output back to [B, C, h, w]."""
        return fm.unpack_latents(pred, height, width)

    def transformer_inputs(self, models: ModelBundle, noisy: torch.Tensor, sigmas: torch.Tensor,
                           text: Any) -> Dict[str, Any]:
        """The transformer's keyword arguments for noisy latents [B, C, h, w] at noise levels ``sigmas``."""
        b, _, h, w = noisy.shape
        device = noisy.device
        hidden = text.hidden.to(device)
        guidance = None
        if getattr(models.transformer.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(self.config.guidance), device=device, dtype=torch.float32)
        return {
            "hidden_states": fm.pack_latents(noisy),
            "timestep": sigmas.to(device),  # FLUX multiplies by 1000 inside
            "guidance": guidance,
            "pooled_projections": text.pooled.to(device),
            "encoder_hidden_states": hidden,
            "txt_ids": fm.text_ids(hidden.shape[1], device, noisy.dtype),
            "img_ids": fm.latent_image_ids(h, w, device, noisy.dtype),
        }

    # ------------------------------------------------------------------ images
    def prompt_kwargs(self, encoder: Any, params: Any) -> Dict[str, Any]:
        """FLUX has no negative prompt (no true CFG): ``params.cfg`` is the distilled guidance scale
        of dev-style models (schnell-style ones ignore it) and ``params.negative_prompt`` is ignored."""
        text = encoder([params.prompt])
        return {"prompt_embeds": text.hidden, "pooled_prompt_embeds": text.pooled,
                "max_sequence_length": text.hidden.shape[1]}


def build_family(config: Any) -> FluxFamily:
    """Factory of the ``flux`` component."""
    return FluxFamily(config)
