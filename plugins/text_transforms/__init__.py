"""Built-in text transforms: template_fill, tag_shuffle, tag_dropout, caption_dropout.

Registration imports only the attrs configs; the transforms load when a pipeline uses them.
"""
from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry

from .config import CaptionDropoutConfig, TagDropoutConfig, TagShuffleConfig, TemplateFillConfig


@hookimpl
def hcp_register_text_transforms(registry: FamilyRegistry) -> None:
    registry.add("template_fill", config=TemplateFillConfig, factory="hcp_plugins.text_transforms.template_fill:build")
    registry.add("tag_shuffle", config=TagShuffleConfig, factory="hcp_plugins.text_transforms.tags:build_shuffle")
    registry.add("tag_dropout", config=TagDropoutConfig, factory="hcp_plugins.text_transforms.tags:build_dropout")
    registry.add("caption_dropout", config=CaptionDropoutConfig, factory="hcp_plugins.text_transforms.caption_dropout:build")
