"""Listing the files of a data folder (shared by the image_folder source and the caption tool)."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators (the form caption files use)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def list_files(root: str, recursive: bool = True, skip_dirs: Optional[Sequence[str]] = None) -> List[str]:
    """Files under ``root`` as sorted ``/``-separated relative paths.

    Hidden files and folders (names starting with ".") and the folders in ``skip_dirs`` are left out.
    """
    skip = {os.path.realpath(d) for d in (skip_dirs or ())}
    out: List[str] = []
    pending = [("", root)]  # (relative prefix, folder)
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if recursive and os.path.realpath(entry.path) not in skip:
                        pending.append((f"{prefix}{entry.name}/", entry.path))
                elif entry.is_file():
                    out.append(prefix + entry.name)
    out.sort()
    return out
