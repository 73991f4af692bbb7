"""Built-in data sources: image_folder.

Registration imports only the attrs config; the scanner loads when a pipeline uses it.
"""
from hcp_core.hookspecs import hookimpl
from hcp_core.registry import FamilyRegistry

from .config import ImageFolderConfig


@hookimpl
def hcp_register_data_sources(registry: FamilyRegistry) -> None:
    registry.add("image_folder", config=ImageFolderConfig, factory="hcp_plugins.data_sources.image_folder:ImageFolderSource")
