"""The Stable Diffusion 3 / 3.5 family (``sd3``).

* **Parts** (diffusers naming): ``transformer`` (``SD3Transformer2DModel``, an MMDiT patching
  2x2 latents itself), ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (CLIP-G), both
  ``CLIPTextModelWithProjection``, ``text_encoder_3`` (T5), a 16-channel ``vae`` and a
  flow-matching Euler ``scheduler`` (static shift 3.0).
* **Prompts**: :class:`SD3PromptEncoder` computes exactly what
  ``StableDiffusion3Pipeline.encode_prompt`` does: each CLIP padded/truncated to 77 tokens, its
  penultimate hidden states (``clip_skip = N``: ``hidden_states[-(N + 2)]``, no final layer norm)
  concatenated on the feature axis (CLIP-L first), zero-padded to T5's width, then followed by
  T5's last hidden states (``max_sequence_length`` tokens) on the sequence axis; the pooled
  conditioning is both CLIPs' projected pooled outputs, concatenated. No 75-token chunks: SD3
  truncates each CLIP prompt at 77 tokens (with a warning), as diffusers does.
* **Objective**: rectified flow (:mod:`.flow_matching`, shared with FLUX in :mod:`.flow_common`):
  per sample sigma from the configured density and static ``shift``, ``x_t = (1 - sigma) x0 +
  sigma noise``; the transformer gets ``x_t`` unpacked, ``sigma * 1000`` as its timestep, the text
  tokens and the pooled projection, and predicts the velocity ``noise - x0``.
* **Images**: diffusers' ``StableDiffusion3Pipeline`` around the bundle's modules, with real
  classifier-free guidance: the prompt and ``negative_prompt`` both encoded by the run's encoder.

Local diffusers folders load, and single-file SD3 transformer checkpoints with ``model.config``
naming the diffusers folder that supplies the other parts (see :class:`.flow_common.FlowMatchingFamily`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Union

import attrs
import torch

from hcp_core.errors import ConfigError
from hcp_core.interfaces import ModelBundle
from hcp_core.models.text_encoding import PromptEncoder, num_encoder_layers

from .config import SD3Config
from .default_layers import SD3 as DEFAULT_LAYERS
from .flow_common import FlowMatchingFamily, FlowModelSpec, TwoStepPromptEncoder, read_index
from .flow_common import t5_hidden_states, tokenize_to_length, tokenizer_class

#: Folder parts of an SD3 diffusers model, all required.
SD3_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
             "tokenizer_3", "scheduler")
#: Parts that are torch modules (frozen after loading).
MODULE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
#: SD3 conditions on the CLIPs' penultimate layer: ``clip_skip = 0`` is one layer back already.
SD3_BASE_SKIP = 1


# --------------------------------------------------------------------------- prompt encoding
@attrs.frozen
class SD3Prompts:
    """What :class:`SD3PromptEncoder` returns for a batch of prompts."""

    hidden: torch.Tensor  # [B, 77 + max_sequence_length, d_t5]: the transformer's encoder_hidden_states
    pooled: torch.Tensor  # [B, d_proj_L + d_proj_G]: the transformer's pooled_projections


def max_clip_skip(models: ModelBundle) -> int:
    """The largest ``clip_skip`` SD3's CLIPs allow: their layers less two (the penultimate layer is skip 0)."""
    layers = min(num_encoder_layers(models.text_encoder), num_encoder_layers(models.text_encoder_2))
    return layers - SD3_BASE_SKIP - 1


class SD3PromptEncoder(TwoStepPromptEncoder):
    """Prompts -> SD3 text conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` computes it.

    The two CLIP encoders are hcp :class:`PromptEncoder` objects limited to one 77-token window
    (``encoders``: prompt tuning swaps them for encoders that expand custom words, CLIP-L's and
    CLIP-G's vectors each in its own); T5 is tokenized to ``max_sequence_length`` from the prompt
    as written (a custom word's name is plain text to it). :meth:`tokenize` and :meth:`encode` are
    separate steps so wrappers can change the token ids; nothing here disables gradients, so
    trained text-encoder weights (and custom-word vectors) get them through :meth:`encode`.
    """

    def __init__(self, models: ModelBundle, *, clip_skip: int = 0, max_sequence_length: int = 256) -> None:
        if not 0 <= clip_skip <= max_clip_skip(models):
            raise ConfigError(
                f"model.clip_skip = {clip_skip} is out of range for this SD3 model: its CLIP text encoders have "
                f"{max_clip_skip(models) + SD3_BASE_SKIP + 1} layers and SD3 already uses the penultimate one, so "
                f"clip_skip must be between 0 and {max_clip_skip(models)}."
            )
        self.clip_skip = clip_skip
        skip = clip_skip + SD3_BASE_SKIP
        self.encoders = [
            PromptEncoder(models.tokenizer, models.text_encoder, clip_skip=skip, max_chunks=1, norm_after_skip=False),
            PromptEncoder(models.tokenizer_2, models.text_encoder_2, clip_skip=skip, max_chunks=1, norm_after_skip=False),
        ]
        self.tokenizer_3 = models.tokenizer_3
        self.text_encoder_3 = models.text_encoder_3
        self.max_sequence_length = int(max_sequence_length)

    def tokenize(self, prompts: Union[str, Sequence[str]]) -> Dict[str, torch.Tensor]:
        """``{"clip": [B, 77], "clip_2": [B, 77], "t5": [B, max_sequence_length]}`` token ids."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        first, second = (encoder.tokenize(prompts) for encoder in self.encoders)
        t5 = tokenize_to_length(self.tokenizer_3, prompts, self.max_sequence_length, "T5")
        return {"clip": first, "clip_2": second, "t5": t5}

    def encode(self, ids: Mapping[str, torch.Tensor]) -> SD3Prompts:
        """The joint text tokens and the pooled projection for ids from :meth:`tokenize`."""
        first = self.encoders[0].encode_with_pooled(ids["clip"])
        second = self.encoders[1].encode_with_pooled(ids["clip_2"])
        dtype = self.encoders[0].text_encoder.dtype  # the pipeline casts both to text_encoder's dtype
        clip = torch.cat([first.hidden.to(dtype), second.hidden.to(dtype)], dim=-1)
        t5 = t5_hidden_states(self.text_encoder_3, ids["t5"])
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5.to(clip.device)], dim=-2)
        pooled = torch.cat([first.pooled, second.pooled.to(first.pooled.device)], dim=-1)
        return SD3Prompts(hidden=hidden, pooled=pooled)


# --------------------------------------------------------------------------- the family
class SD3Family(FlowMatchingFamily):
    """SD3 / 3.5: loading, CLIP-L + CLIP-G + T5 prompts, the flow-matching objective, SD3 pipeline images."""

    config_class = SD3Config
    spec = FlowModelSpec(label="SD3", kind="sd3", folder_parts=SD3_PARTS, module_parts=MODULE_PARTS,
                         pipeline_class="StableDiffusion3Pipeline",
                         example_source="stabilityai/stable-diffusion-3.5-medium")
    #: Model parts adapters may target ([[transformer]], [[lora_transformer]], [[lora_text_encoder]], ...).
    parts = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    #: What [[lora_*]] groups without ``layers`` target (attention and MLP layers, :mod:`.default_layers`).
    default_layer_patterns = DEFAULT_LAYERS

    def part_classes(self, path: Path) -> Dict[str, Any]:
        """Part name -> the class that loads it (the T5 tokenizer as ``model_index.json`` names it)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        return {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
                "text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
                "text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer,
                "text_encoder_3": T5EncoderModel, "tokenizer_3": tokenizer_class(read_index(path), "tokenizer_3"),
                "scheduler": FlowMatchEulerDiscreteScheduler}  # fmt: skip

    def patch_size(self, models: ModelBundle) -> int:
        """The transformer's own patch size (2 on SD3 / 3.5)."""
        return int(getattr(models.transformer.config, "patch_size", 2))

    # ------------------------------------------------------------------ prompts
    def prompt_encoder(self, models: ModelBundle, *, clip_skip: int = 0) -> SD3PromptEncoder:
        """:class:`SD3PromptEncoder`; ``clip_skip = N`` takes both CLIPs' ``hidden_states[-(N + 2)]``."""
        return SD3PromptEncoder(models, clip_skip=clip_skip, max_sequence_length=self.config.max_sequence_length)

    # ------------------------------------------------------------------ the objective
    def transformer_inputs(self, models: ModelBundle, noisy: torch.Tensor, sigmas: torch.Tensor,
                           text: Any) -> Dict[str, Any]:
        """The transformer's keyword arguments for noisy latents [B, C, h, w] at noise levels ``sigmas``."""
        device = noisy.device
        return {
            "hidden_states": noisy,  # the transformer patches 2x2 itself
            "timestep": sigmas.to(device) * 1000,  # SD3 takes the scheduler's timestep, sigma * 1000
            "encoder_hidden_states": text.hidden.to(device),
            "pooled_projections": text.pooled.to(device),
        }

    # ------------------------------------------------------------------ images
    def prompt_kwargs(self, encoder: Any, params: Any) -> Dict[str, Any]:
        """Real classifier-free guidance: the prompt and ``params.negative_prompt`` (empty by
        default, as the pipeline's) both encoded by ``encoder``; ``params.cfg`` is the guidance scale."""
        text = encoder([params.prompt, params.negative_prompt or ""])
        return {"prompt_embeds": text.hidden[:1], "pooled_prompt_embeds": text.pooled[:1],
                "negative_prompt_embeds": text.hidden[1:], "negative_pooled_prompt_embeds": text.pooled[1:]}


def build_family(config: Any) -> SD3Family:
    """Factory of the ``sd3`` component."""
    return SD3Family(config)
