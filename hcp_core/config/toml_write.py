"""A small TOML writer for resolved pipelines (the standard library only reads TOML)."""
from __future__ import annotations

import json
import math
import re
from typing import Any, List, Mapping

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _string(text: str) -> str:
    """A TOML basic string: JSON escapes, plus DEL, which TOML (unlike JSON) forbids raw."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        items = [f"{_key(str(k))} = {_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dumps(data: Mapping[str, Any]) -> str:
    """Serialize nested mappings to TOML; ``None`` values are left out (TOML has no null)."""
    lines: List[str] = []
    _emit(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit(table: Mapping[str, Any], prefix: List[str], lines: List[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, Mapping) and not _is_table_array(v)]
    for k, v in scalars:
        lines.append(f"{_key(str(k))} = {_value(v)}")
    for k, v in table.items():
        path = prefix + [_key(str(k))]
        if isinstance(v, Mapping):
            if scalars or lines:
                lines.append("")
            lines.append(f"[{'.'.join(path)}]")
            _emit(v, path, lines)
        elif _is_table_array(v):
            for item in v:
                lines.append("")
                lines.append(f"[[{'.'.join(path)}]]")
                _emit(item, path, lines)
