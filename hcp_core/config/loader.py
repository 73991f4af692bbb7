"""Read a pipeline: TOML files with ``base = [...]`` inheritance, then command-line overrides.

Merge rule: tables merge key by key, anything else (lists included) is replaced whole, and the
file that names a base wins over it. Base paths are relative to the file that names them.

Every fault of a file (missing, a folder, not UTF-8 text, not TOML, nested absurdly deep) is one
:class:`ConfigError` naming the file, never a traceback.
"""
from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, MutableMapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import ConfigError

BASE_KEY = "base"
#: Deepest nesting of tables and lists a pipeline may have. Real pipelines nest about 5 deep;
#: the limit keeps merging, copying and validating (all recursive) far from Python's own limit.
MAX_DEPTH = 32


def read_toml(path: Path) -> Dict[str, Any]:
    """Parse one TOML file; every problem with it is a ConfigError naming the file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file: give the path of a .toml file") from None
    except UnicodeDecodeError as exc:  # binary files land here too
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}): save the pipeline as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: values are nested too deeply (at most {MAX_DEPTH} levels)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    check_depth(data, str(path))
    return data


def check_depth(data: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """ConfigError if tables/lists in ``data`` nest deeper than ``limit`` (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (Mapping, list)):
                if depth + 1 > limit:
                    raise ConfigError(f"{where}: tables and lists are nested more than {limit} levels deep; "
                                      "a pipeline needs only a few")
                stack.append((child, depth + 1))


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
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()
    except RecursionError:
        raise ConfigError(f"override value {text[:40]!r}...: nested too deeply (at most {MAX_DEPTH} levels)") from None
    check_depth(value, f"override value {text[:40]!r}")
    return value


#: ``name[0][1]``: a key segment with list indices, as error messages print paths.
_SEGMENT = re.compile(r"([^\[\]]*)((?:\[-?\d+\])*)")


def split_key(key: str, item: str) -> tuple[List[str], set[int]]:
    """``lora_unet[0].rank`` or ``lora_unet.0.rank`` -> ``["lora_unet", "0", "rank"]``, plus the
    positions of the parts written in brackets (those must address a list item)."""
    parts: List[str] = []
    bracketed: set[int] = set()
    for segment in key.split("."):
        match = _SEGMENT.fullmatch(segment.strip())
        if match is None or not any(match.groups()):
            raise ConfigError(f"override '{item}': cannot read the key '{key}'; write it as in "
                              "data.dataset1.batch_size=2 or lora_unet[0].rank=8")
        if match.group(1):
            parts.append(match.group(1))
        for index in re.findall(r"-?\d+", match.group(2)):
            bracketed.add(len(parts))
            parts.append(index)
    return parts, bracketed


def apply_override(data: MutableMapping[str, Any], item: str) -> None:
    """Apply one ``key.sub=value`` override in place; list items are addressed by index, dotted
    (``lora_unet.0.rank=8``) or as messages print them (``lora_unet[0].rank=8``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not KEY=VALUE (for example: data.dataset1.batch_size=2)")
    parts, bracketed = split_key(key, item)
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"override '{item[:60]}...': the key has {len(parts)} parts; at most {MAX_DEPTH} levels")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        _check_bracket(node, depth, bracketed, parts, item)
        if isinstance(node, list):
            node = node[_index(part, node, where, item)]
            continue
        child = node.get(part)
        if child is None and depth + 1 in bracketed:
            # ``x[0].y`` addresses an item of a list that is not there: a table named "0" would
            # only fail validation later with a less helpful message.
            raise ConfigError(f"override '{item}': '{where}' is not set, so it has no item {parts[depth + 1]}; "
                              f"set the whole list, e.g. '{where}=[{{...}}]'")
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"override '{item}': '{where}' is a value ({child!r}), not a table")
        node = child
    last = parts[-1]
    _check_bracket(node, len(parts) - 1, bracketed, parts, item)
    value = parse_override_value(raw)
    if isinstance(node, list):
        node[_index(last, node, key, item)] = value
    else:
        node[last] = value


def _check_bracket(node: Any, depth: int, bracketed: set[int], parts: List[str], item: str) -> None:
    """A bracketed index (``x[0]``) must address a list; a table has no items by number."""
    if depth in bracketed and not isinstance(node, list):
        listing = ".".join(parts[:depth]) or "(top level)"
        raise ConfigError(f"override '{item}': '{listing}' is a table, not a list; "
                          f"name its key instead of [{parts[depth]}]")


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
