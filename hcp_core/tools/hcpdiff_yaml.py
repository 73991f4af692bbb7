"""Read an HCP-Diffusion training YAML as that tool did: its ``_base_`` chain, then ``${...}``.

HCP-Diffusion (``hcpdiff.utils.utils.load_config``) loads a file with OmegaConf, then for each
entry of its ``_base_`` list in order merges ``cfg = merge(base, cfg)``: the file wins over every
base, and an earlier-listed base wins over a later one. Merging is OmegaConf's: mappings merge key
by key, anything else (lists, ``null``) replaces. Base paths were relative to the working folder
the original was started in (its repository root, ``cfgs/train/...``); here they are looked up
relative to ``root`` when given, the file's folder and each folder above it, then the working folder.

Interpolations are resolved on the merged tree: ``${a.b}`` (absolute), ``${.x}`` / ``${..x}``
(relative: one dot is the node's own table, each further dot one level up), and the resolvers the
examples use: ``times`` (a product), ``hcp.eval`` (arithmetic only, never arbitrary code),
``hcp.time`` (now, as a folder name) and ``oc.env``. Anything else stays as written and is
reported, so the converter can name the key.
"""
from __future__ import annotations

import ast
import operator
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..errors import UserError

BASE_KEY = "_base_"
#: An interpolation with no interpolation inside it (resolved innermost first).
_INNER = re.compile(r"\$\{([^${}]*)\}")
#: How deep references may chain (``${a}`` -> ``${b}`` -> ...) before it counts as a loop.
MAX_REFERENCE_DEPTH = 32
Path_ = Tuple[Any, ...]  # keys and list indices from the root


class Unresolved(Exception):
    """An interpolation that cannot be resolved; the message says why."""


def read_yaml(path: Path) -> Dict[str, Any]:
    """One YAML file as a mapping; every problem is a UserError naming the file."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers and accelerate
        raise UserError("convert-config needs PyYAML to read HCP-Diffusion configs: pip install pyyaml") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder: give the HCP-Diffusion .yaml file") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: an HCP-Diffusion config is a mapping of keys, got a {type(data).__name__}")
    return data


def merge(base: Any, over: Any) -> Any:
    """OmegaConf's merge of ``over`` onto ``base``: mappings recursively, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return over


def find_base(name: str, owner: Path, root: Optional[Path]) -> Path:
    """Where base ``name`` named in ``owner`` is (see the module docstring for the search order)."""
    candidates: List[Path] = []
    if Path(name).is_absolute():
        candidates.append(Path(name))
    else:
        if root is not None:
            candidates.append(root / name)
        candidates += [folder / name for folder in (owner.parent, *owner.parent.parents)]
        candidates.append(Path.cwd() / name)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    hint = " (HCP-Diffusion paths are relative to the folder it ran in: give it with --root DIR)"
    raise UserError(f"{owner}: _base_ file '{name}' not found next to it, in a folder above it or in the "
                    f"working folder{hint}")


def load_chain(path: Path, root: Optional[Path] = None, _seen: Sequence[Path] = ()) -> Tuple[Dict[str, Any], List[Path]]:
    """The file merged over its bases as HCP-Diffusion merged them, and every file read (in order)."""
    path = path.resolve()
    if path in _seen:
        raise UserError("config files inherit from each other in a loop: " + " -> ".join(str(p) for p in (*_seen, path)))
    cfg = read_yaml(path)
    bases = cfg.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: _base_ must be a list of file paths, got {bases!r}")
    files = [path]
    for name in bases:
        base, read = load_chain(find_base(name, path, root), root, (*_seen, path))
        cfg = merge(base, cfg)  # the file (and bases listed before this one) win
        files += read
    return cfg, files


# --------------------------------------------------------------------------- arithmetic
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def arithmetic(text: str) -> Any:
    """The value of ``512*768``-style arithmetic (numbers and + - * / // % ** only); ValueError otherwise."""
    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"only arithmetic on numbers is evaluated, not {text!r}")

    try:
        tree = ast.parse(str(text).strip().strip("'\""), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {text!r}") from None
    return value(tree.body)


# --------------------------------------------------------------------------- interpolation
class Resolver:
    """Resolves every ``${...}`` of a merged config; ``references`` collects the keys read."""

    def __init__(self, cfg: Mapping[str, Any], now: Optional[float] = None) -> None:
        self.cfg = cfg
        self.now = time.time() if now is None else now
        self.references: Set[str] = set()
        self.problems: Dict[str, str] = {}  # dotted key -> why its interpolation stayed as written

    def timestamp(self) -> str:
        """The conversion time as HCP-Diffusion named run folders (``2024-01-31-12-00-00``)."""
        return time.strftime("%Y-%m-%d-%H-%M-%S", time.localtime(self.now))

    def resolve_tree(self) -> Dict[str, Any]:
        """A copy of the config with every resolvable interpolation replaced by its value."""
        return self._walk(self.cfg, ())

    def _walk(self, node: Any, path: Path_) -> Any:
        if isinstance(node, dict):
            return {k: self._walk(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self._walk(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            try:
                return self.value(node, path, 0)
            except Unresolved as exc:
                self.problems[dotted(path)] = str(exc)
        return node

    def value(self, text: str, path: Path_, depth: int) -> Any:
        """``text`` with its interpolations resolved; a string that is one interpolation keeps the
        referenced value's type (a number, a table)."""
        if depth > MAX_REFERENCE_DEPTH:
            raise Unresolved(f"references chain more than {MAX_REFERENCE_DEPTH} deep (a loop?)")
        while True:
            match = _INNER.search(text)
            if match is None:
                return text
            resolved = self._one(match.group(1).strip(), path, depth)
            if match.span() == (0, len(text)):
                return resolved
            text = text[: match.start()] + str(resolved) + text[match.end():]

    def _walk_value(self, value: Any, path: Path_, depth: int) -> Any:
        if isinstance(value, str) and "${" in value:
            return self.value(value, path, depth + 1)
        if isinstance(value, (dict, list)):  # a referenced table may hold interpolations of its own
            return self._walk(value, path)
        return value

    def _one(self, body: str, path: Path_, depth: int) -> Any:
        name, colon, args = body.partition(":")
        if colon:
            return self._call(name.strip(), args.strip(), body)
        target = self._target(body, path)
        self.references.add(dotted(target))
        value = lookup(self.cfg, target, body)
        return self._walk_value(value, target, depth + 1)

    def _call(self, name: str, args: str, body: str) -> Any:
        if name == "times":
            parts = [a.strip() for a in args.split(",") if a.strip()]
            try:
                product: Any = 1
                for part in parts:
                    product *= arithmetic(part)
            except ValueError as exc:
                raise Unresolved(f"${{{body}}}: {exc}") from None
            return product
        if name == "hcp.eval":
            try:
                return arithmetic(args)
            except ValueError as exc:
                raise Unresolved(f"${{{body}}}: {exc}") from None
        if name == "hcp.time":
            return self.timestamp()
        if name in ("oc.env", "env"):
            var, _, default = args.partition(",")
            value = os.environ.get(var.strip())
            if value is None and not default:
                raise Unresolved(f"${{{body}}}: environment variable {var.strip()} is not set")
            return value if value is not None else default.strip().strip("'\"")
        raise Unresolved(f"${{{body}}}: resolver '{name}' is HCP-Diffusion code that hcp does not run")

    def _target(self, body: str, path: Path_) -> Path_:
        keys = split_reference(body.lstrip("."))
        dots = len(body) - len(body.lstrip("."))
        if dots == 0:
            return tuple(keys)
        # One dot: the table holding the key being resolved; each further dot one level up.
        if len(path) - dots < 0:
            raise Unresolved(f"${{{body}}} goes above the top of the config")
        return (*path[: len(path) - dots], *keys)


def split_reference(text: str) -> List[Any]:
    """``a.b[0].c`` -> ``['a', 'b', 0, 'c']``."""
    out: List[Any] = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", text):
        out.append(int(part[1:-1]) if part.startswith("[") else part)
    return out


def lookup(cfg: Any, target: Path_, body: str) -> Any:
    """The value at ``target`` (keys and indices); digits also index lists, as in OmegaConf."""
    node = cfg
    for key in target:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and str(key).lstrip("-").isdigit() and -len(node) <= int(key) < len(node):
            node = node[int(key)]
        else:
            raise Unresolved(f"${{{body}}}: the config has no '{dotted(target)}'")
    return node


def dotted(path: Sequence[Any]) -> str:
    """``('data', 'dataset1', 'source')`` -> ``data.dataset1.source``; list indices as ``[i]``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def load_hcpdiff_config(path: str | os.PathLike, root: Optional[str | os.PathLike] = None,
                        now: Optional[float] = None) -> Tuple[Dict[str, Any], Resolver, List[Path]]:
    """The merged, resolved config, the resolver (its ``references`` and ``problems``) and the files read."""
    merged, files = load_chain(Path(path), Path(root).resolve() if root is not None else None)
    resolver = Resolver(merged, now)
    return resolver.resolve_tree(), resolver, files


__all__ = ["Resolver", "Unresolved", "arithmetic", "dotted", "find_base", "load_chain", "load_hcpdiff_config",
           "lookup", "merge", "read_yaml", "split_reference"]
