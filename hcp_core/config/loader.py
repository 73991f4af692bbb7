"""Read a pipeline: TOML files with ``base = [...]`` inheritance, then command-line overrides.

Merge rule: tables merge key by key, anything else (lists included) is replaced whole, and the
file that names a base wins over it. Base paths are relative to the file that names them.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError

BASE_KEY = "base"


def read_toml(path: Path) -> Dict[str, Any]:
    """Parse one TOML file; syntax errors name the file and position."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None


def deep_merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> Dict[str, Any]:
    """``child`` over ``base``: tables merge recursively, every other value is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_merged(path: str | os.PathLike, _chain: Sequence[Path] = ()) -> Dict[str, Any]:
    """The file at ``path`` merged over its bases (recursively)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config files inherit from each other in a loop: {cycle}")
    data = read_toml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a list of file paths, got {bases!r}")
    merged: Dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: base file '{base}' not found (looked for {base_path})")
        merged = deep_merge(merged, load_merged(base_path, (*_chain, path)))
    return deep_merge(merged, data)


def parse_override_value(text: str) -> Any:
    """A command-line value as a TOML literal (``2``, ``"x"``, ``[1, 2]``, ``{a = 1}``, ``true``).

    Text that is not a TOML literal is taken as a plain string, so ``model.pretrained=models/x``
    works without shell-quoted quotes.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def apply_override(data: MutableMapping[str, Any], item: str) -> None:
    """Apply one ``key.sub=value`` override in place; list items are addressed by index."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not KEY=VALUE (for example: data.dataset1.batch_size=2)")
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where, item)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"override '{item}': '{where}' is a value ({child!r}), not a table")
        node = child
    last = parts[-1]
    value = parse_override_value(raw)
    if isinstance(node, list):
        node[_index(last, node, key, item)] = value
    else:
        node[last] = value


def _index(part: str, node: List[Any], where: str, item: str) -> int:
    try:
        idx = int(part)
        node[idx]
        return idx
    except (ValueError, IndexError):
        listing = where.rpartition(".")[0] or where
        if not node:
            raise ConfigError(f"override '{item}': '{listing}' is an empty list; set it whole, e.g. '{listing}=[...]'") from None
        raise ConfigError(
            f"override '{item}': '{listing}' is a list of {len(node)} items; use an index 0..{len(node) - 1}"
        ) from None


def load_raw(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The merged pipeline as plain data: bases, the file, then each override in order."""
    data = load_merged(path)
    for item in overrides:
        apply_override(data, item)
    return data
