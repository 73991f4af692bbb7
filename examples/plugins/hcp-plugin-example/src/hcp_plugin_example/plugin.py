"""The module the ``hcp`` entry point names: config classes and register hooks only.

hcp imports this module at start-up (``hcp --help`` included), so it imports nothing heavy: the
factories live in other modules that hcp imports only when a pipeline uses them.
"""
from __future__ import annotations

from typing import Any

import attrs
from attrs import validators

from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry

#: The VAE downsamples by 8: hcp needs every bucket side to be a multiple of it.
LATENT_FACTOR = 8


def _multiple_of_latent_factor(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < LATENT_FACTOR or value % LATENT_FACTOR:
        # Passing the attribute lets hcp name the key at fault.
        raise ValueError(f"must be a positive multiple of {LATENT_FACTOR}, got {value!r}", attribute)


@attrs.define
class MultipleOfConfig:
    """Keep each image's aspect ratio: longer side scaled to ``max_side``, both sides rounded down
    to a multiple of ``multiple``; one bucket per distinct size. crop = "center" | "random"."""

    max_side: int = attrs.field(default=512, validator=_multiple_of_latent_factor)
    multiple: int = attrs.field(default=64, validator=_multiple_of_latent_factor)
    crop: str = attrs.field(default="center", validator=validators.in_(("center", "random")))


@attrs.define
class CaptionPrefixConfig:
    """Put ``text`` in front of the caption, joined by ``separator``; an empty caption becomes
    ``text`` alone. With ``probability`` < 1 the prefix is added to that share of samples."""

    text: str
    separator: str = ", "
    probability: float = attrs.field(default=1.0, validator=[validators.ge(0.0), validators.le(1.0)])


@hookimpl
def hcp_register_buckets(registry: FamilyRegistry) -> None:
    registry.add("multiple_of", config=MultipleOfConfig, factory="hcp_plugin_example.buckets:MultipleOfBucket")


@hookimpl
def hcp_register_text_transforms(registry: FamilyRegistry) -> None:
    registry.add("caption_prefix", config=CaptionPrefixConfig, factory="hcp_plugin_example.text:CaptionPrefix")
