"""Prompt files: a ``.parquet`` prompt database (first or named column) or a ``.txt`` (one a line).

Read by ``hcp generate --prompt-file`` and ``hcp tools gen-from-prompts``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

from ..data.captions import clean_caption
from ..errors import UserError


class PromptFileError(UserError):
    """A prompt database that cannot be read."""


def read_prompts(path: str | os.PathLike, column: Optional[str] = None) -> List[str]:
    """The non-empty prompts of a ``.parquet`` (first or named column) or ``.txt`` (one a line) file."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"--prompt-file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        values = _parquet_column(path, column)
    elif suffix == ".txt":
        if column is not None:
            raise PromptFileError(f"--column {column!r}: a .txt prompt file has no columns (one prompt a line)")
        values = path.read_text(encoding="utf-8-sig").splitlines()
    else:
        raise PromptFileError(f"--prompt-file {path}: use a .parquet prompt database or a .txt file with one prompt a line")
    prompts = [clean_caption(str(v)) for v in values if v is not None and str(v).strip()]
    if not prompts:
        raise PromptFileError(f"--prompt-file {path} holds no prompt" + (f" in column {column!r}" if column else ""))
    return prompts


def _parquet_column(path: Path, column: Optional[str]) -> List[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptFileError("reading .parquet prompt files needs pyarrow: pip install pyarrow") from None
    try:
        schema = pq.read_schema(str(path))
    except Exception as exc:
        raise PromptFileError(f"--prompt-file {path} is not a readable parquet file: {exc}") from None
    names = list(schema.names)
    if not names:
        raise PromptFileError(f"--prompt-file {path} has no columns")
    name = column if column is not None else names[0]
    if name not in names:
        raise PromptFileError(f"--column {name!r} is not in {path}; its columns: {', '.join(names)}")
    return pq.read_table(str(path), columns=[name]).column(name).to_pylist()
