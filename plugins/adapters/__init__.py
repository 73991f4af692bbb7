"""Built-in adapters: what a run trains.

Registration only: each adapter's config class is light (attrs), its factory module (torch) is
imported when a pipeline uses it.
"""
from __future__ import annotations

from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry

from .finetune.config import FinetuneGroup, FinetuneOptions
from .lora.config import LoraGroupConfig, LoraOptions
from .lycoris.config import LycorisGroupConfig, LycorisOptions
from .prompt_tuning.config import PromptTuningConfig


@hookimpl
def hcp_register_adapters(registry: FamilyRegistry) -> None:
    """Register ``lora`` ([[lora_unet]], [[lora_transformer]], [[lora_text_encoder]],
    [[lora_text_encoder_2]], [[lora_text_encoder_3]], [lora]), ``lycoris`` ([[lycoris_unet]] ...
    [[lycoris_text_encoder_3]], [lycoris]), ``finetune`` ([[unet]],
    [[transformer]], [[text_encoder]], [[text_encoder_2]], [[text_encoder_3]]) and
    ``prompt_tuning`` ([tokenizer_pt]).

    The ``*_text_encoder_2`` sections target SDXL's second text encoder (OpenCLIP bigG);
    ``[[lora_text_encoder]]`` / ``[[text_encoder]]`` are its first (CLIP ViT-L) on SDXL.
    ``*transformer`` sections target the diffusion transformer of families that have one
    (SD3, FLUX); ``*_text_encoder_3`` SD3's T5.
    """
    registry.add(
        "lora",
        config=LoraGroupConfig,
        factory="hcp_plugins.adapters.lora.adapter:build_lora_adapter",
        sections={"lora_unet": "unet", "lora_transformer": "transformer", "lora_text_encoder": "text_encoder",
                  "lora_text_encoder_2": "text_encoder_2", "lora_text_encoder_3": "text_encoder_3"},
        options=("lora", LoraOptions),
        files="hcp_plugins.adapters.lora.files:LoraFiles",  # hcp generate --lora, hcp tools merge-lora
    )
    registry.add(  # LoHa / LoKr (docs/lycoris.md); DoRA is lora's `dora = true`
        "lycoris",
        config=LycorisGroupConfig,
        factory="hcp_plugins.adapters.lycoris.adapter:build_lycoris_adapter",
        sections={"lycoris_unet": "unet", "lycoris_transformer": "transformer", "lycoris_text_encoder": "text_encoder",
                  "lycoris_text_encoder_2": "text_encoder_2", "lycoris_text_encoder_3": "text_encoder_3"},
        options=("lycoris", LycorisOptions),
        files="hcp_plugins.adapters.lycoris.files:LycorisFiles",
    )
    registry.add(
        "finetune",
        config=FinetuneGroup,
        factory="hcp_plugins.adapters.finetune.adapter:FinetuneAdapter",
        sections={"unet": "unet", "transformer": "transformer", "text_encoder": "text_encoder",
                  "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3"},
        options=("finetune", FinetuneOptions),  # [finetune]: export = ["trained", "diffusers", "single_file"]
    )
    registry.add(
        "prompt_tuning",
        config=PromptTuningConfig,
        factory="hcp_plugins.adapters.prompt_tuning.adapter:PromptTuningAdapter",
        sections={"tokenizer_pt": "text_encoder"},
    )
