"""LoRA for the UNet and text encoders: ``[[lora_unet]]`` / ``[[lora_text_encoder]]`` groups.

Only :mod:`.config` is imported at plugin discovery; the rest (torch) loads when a pipeline uses
LoRA. See docs/lora.md.
"""
