"""Captions: ``.txt`` files beside images, or one ``.json``/``.yaml`` file mapping images to captions.

Keys of a caption file are matched to images by, in order: the image's path relative to the
image folder (``"sub/a.png"``, what ``hcp tools convert-captions`` writes), its file name
(``"a.png"``, what the original tool wrote) and its stem (``"a"``). Backslashes count as slashes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import DataError
from ..interfaces import Problem

#: The caption file an image folder picks up when its config names none (what the tool writes).
DEFAULT_CAPTION_FILE = "image_captions.json"
CAPTION_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def clean_caption(text: str) -> str:
    """One line, no surrounding whitespace: line breaks inside a caption become spaces."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def read_caption_txt(path: str) -> Tuple[str, Optional[Problem]]:
    """The caption in a ``.txt`` file, and a problem if it had to be read leniently."""
    raw = Path(path).read_bytes()
    try:
        return clean_caption(raw.decode("utf-8-sig")), None
    except UnicodeDecodeError:
        problem = Problem(path, "caption is not valid UTF-8", "undecodable bytes replaced")
        return clean_caption(raw.decode("utf-8", errors="replace")), problem


def load_caption_file(path: str) -> Tuple[Dict[str, str], List[Problem]]:
    """Read a ``.json`` or ``.yaml`` mapping of image name -> caption.

    A value that is a list of tags is joined with ", "; numbers become text; anything else is
    reported and ignored. A file that cannot be parsed is a :class:`DataError`.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in CAPTION_FILE_SUFFIXES:
        raise DataError(f"caption file {path}: use a .json or .yaml file mapping image file names to captions")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"caption file {path} cannot be read: {exc}") from exc
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"caption file {path} is not valid JSON: {exc}") from exc
    else:
        data = _load_yaml(path, text)
    if not isinstance(data, Mapping):
        raise DataError(f"caption file {path} must map image file names to captions, got a {type(data).__name__}")
    captions: Dict[str, str] = {}
    problems: List[Problem] = []
    for key, value in data.items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            value = ", ".join(str(v).strip() for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            problems.append(Problem(path, f"caption for {key!r} is a {type(value).__name__}, not text", "ignored"))
            continue
        captions[str(key)] = clean_caption(value)
    return captions, problems


def _load_yaml(path: str, text: str) -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML ships with the test environment
        raise DataError(f"caption file {path}: reading YAML needs PyYAML (pip install pyyaml), or use .json") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"caption file {path} is not valid YAML: {exc}") from exc


def _norm(key: str) -> str:
    key = key.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def match_captions(
    captions: Mapping[str, str], image_paths: Sequence[str]
) -> Tuple[Dict[str, str], List[str]]:
    """Match caption-file keys to images given by paths relative to the image folder (``/``-separated).

    Returns (relative path -> caption, keys that matched no image). A key that names several
    images by file name or stem (same name in two sub-folders) captions all of them.
    """
    by_path: Dict[str, List[str]] = {}
    by_name: Dict[str, List[str]] = {}
    by_stem: Dict[str, List[str]] = {}
    for rel in image_paths:
        by_path.setdefault(rel, []).append(rel)
        name = rel.rsplit("/", 1)[-1]
        by_name.setdefault(name, []).append(rel)
        by_stem.setdefault(os.path.splitext(name)[0], []).append(rel)
    matched: Dict[str, str] = {}
    unmatched: List[str] = []
    # Exact paths first, so "sub/a.png" beats a bare "a.png" key for that image.
    for level in (by_path, by_name, by_stem):
        for key, caption in captions.items():
            for rel in level.get(_norm(key), ()):
                matched.setdefault(rel, caption)
    for key in captions:
        k = _norm(key)
        if k not in by_path and k not in by_name and k not in by_stem:
            unmatched.append(key)
    return matched, unmatched
