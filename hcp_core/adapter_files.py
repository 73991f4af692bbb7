"""Which adapter reads a file: what ``hcp generate --lora`` and ``hcp tools merge-lora`` ask.

An adapter declares file capabilities with ``registry.add(..., files="module:attr")`` (see
:class:`~hcp_core.interfaces.AdapterFiles`). The core reads only a file's header (tensor names
and metadata, pure Python: no torch) and asks each such adapter whether it reads the file; the
core never knows any adapter or file layout by name.
"""
from __future__ import annotations

import json
import os
from typing import Any, List

import attrs

from .errors import UserError
from .interfaces import FileHeader
from .registry import Component, Registry, describe_blocked

#: A safetensors header larger than this is not one (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


class AdapterFileError(UserError):
    """A file no (unblocked) adapter reads, or that two adapters both claim."""


def read_file_header(path: str | os.PathLike) -> FileHeader:
    """The tensor names and ``__metadata__`` of a ``.safetensors`` file, read from its header only.

    Any other file, or a damaged one, gives an empty header with ``safetensors=False``.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(_MAX_HEADER, os.path.getsize(path) - 8):
                return FileHeader(path)
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return FileHeader(path)
    if not isinstance(header, dict):
        return FileHeader(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    return FileHeader(path, {str(k): str(v) for k, v in metadata.items()}, tuple(header), True)


@attrs.frozen
class FileAdapter:
    """The adapter that reads one file, and its loaded file capabilities."""

    component: Component
    files: Any  # AdapterFiles

    def apply(self, models: Any, path: str, weight: float = 1.0) -> int:
        """Merge the file into ``models`` with ``weight``; the number of layers changed."""
        return int(self.files.apply(models, path, weight))


def _readers(components: List[Component], header: FileHeader) -> List[tuple[Component, Any]]:
    out = []
    for comp in components:
        files = comp.load_files()
        if files is not None and files.reads(header):
            out.append((comp, files))
    return out


def find_file_adapter(registry: Registry, path: str | os.PathLike, *, option: str = "--lora") -> FileAdapter:
    """The one adapter of ``registry`` that reads the file at ``path``.

    Raises :class:`AdapterFileError` (naming ``option`` and the file) when the file is missing,
    when no adapter reads it (saying so when the one that would is blocked by
    ``HCP_BLOCK_PLUGINS``), or when two adapters claim it.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise AdapterFileError(f"{option}: LoRA file not found: {path}")
    header = read_file_header(path)
    readers = _readers(registry.file_adapters(), header)
    if len(readers) > 1:
        names = " and ".join(f"'{c.name}' (plugin '{c.plugin}')" for c, _ in readers)
        raise AdapterFileError(
            f"{option} {path}: adapters {names} both read this file; block one with "
            f"HCP_BLOCK_PLUGINS=PLUGIN:ADAPTER (e.g. '{readers[-1][0].plugin}:{readers[-1][0].name}')"
        )
    if readers:
        return FileAdapter(*readers[0])
    blocked = _readers([c for c in registry.adapters.all_blocked() if c.files], header)
    if blocked:
        raise AdapterFileError(f"{option} {path}: no active adapter reads this file: {describe_blocked(blocked[0][0])}")
    known = ", ".join(c.name for c in registry.file_adapters()) or "none is installed"
    what = "its tensor names match no adapter's layout" if header.safetensors else "it is not a readable .safetensors file"
    raise AdapterFileError(f"{option} {path}: no adapter reads this file ({what}). Adapters that read files: {known}.")


def apply_adapter_file(registry: Registry, models: Any, path: str | os.PathLike, weight: float = 1.0, *, option: str = "--lora") -> int:
    """Find the adapter that reads ``path`` and merge the file into ``models``; layers changed."""
    return find_file_adapter(registry, path, option=option).apply(models, str(path), weight)
