"""Structure merged TOML into typed configs (attrs + cattrs) with messages users can act on.

Every error names the dotted path and the bad value; misspelt keys and component names get a
did-you-mean. The converter is built after plugins load, so late-registered config classes work.
A field whose TOML key is not a Python identifier (``from``) declares it as
``attrs.field(metadata={"key": "from"})``.
"""
from __future__ import annotations

import re
import typing
from typing import Any, Dict, List, Mapping, Optional, Union

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.cols import is_mapping, is_sequence, list_structure_factory

from ..errors import ConfigError, UnknownComponentError, UserError, did_you_mean
from ..registry import ComponentSpec, Registry

TYPE_KEY = "type"


class _ValueProblem(ValueError):
    """A bad primitive value; its message already names the value."""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _strict_int(value: Any, _t: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ValueProblem(f"expected an integer, got {_describe(value)}")
    return value


def _strict_float(value: Any, _t: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _ValueProblem(f"expected a number, got {_describe(value)}")
    return float(value)


def _strict_str(value: Any, _t: Any) -> str:
    if not isinstance(value, str):
        raise _ValueProblem(f"expected a string, got {_describe(value)}")
    return value


def _strict_bool(value: Any, _t: Any) -> bool:
    if not isinstance(value, bool):
        raise _ValueProblem(f"expected true or false, got {_describe(value)}")
    return value


def _int_or_float(value: Any, _t: Any) -> Union[int, float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _ValueProblem(f"expected an integer or a number, got {_describe(value)}")
    return value


def _int_or_str(value: Any, _t: Any) -> Union[int, str]:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _ValueProblem(f"expected an integer or a string, got {_describe(value)}")
    return value


def _renames(cls: type) -> Dict[str, str]:
    return {f.name: f.metadata["key"] for f in attrs.fields(cls) if "key" in f.metadata}


def toml_keys(cls: type) -> List[str]:
    """The keys a TOML table for attrs class ``cls`` may hold."""
    renames = _renames(cls)
    return [renames.get(f.name, f.name) for f in attrs.fields(cls) if f.init]


def make_converter(registry: Registry) -> cattrs.Converter:
    """A converter that knows every registered component of ``registry``."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Union[int, float], _int_or_float)
    conv.register_structure_hook(Union[int, str], _int_or_str)

    def attrs_structure_factory(cls: type):
        overrides = {name: override(rename=key) for name, key in _renames(cls).items()}
        inner = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, **overrides)

        def structure(value: Any, _t: Any) -> Any:
            if not isinstance(value, Mapping):
                raise _ValueProblem(f"expected a table, got {_describe(value)}")
            try:
                return inner(value, cls)
            except ClassValidationError as exc:
                _attach_validator_fields(exc, cls)
                more = _other_scalar_problems(conv, cls, value, exc)
                if more:
                    raise ClassValidationError(exc.message, [*exc.exceptions, *more], cls) from None
                raise
            except (ValueError, TypeError) as exc:
                if _field_of(exc, cls) is None:
                    raise
                raise ClassValidationError(f"While structuring {cls.__name__}", [_noted(exc, cls)], cls) from None

        return structure

    conv.register_structure_hook_factory(lambda t: attrs.has(t) and not _is_spec(t), attrs_structure_factory)

    def spec_structure_factory(spec_cls: type):
        family = registry.families[spec_cls.family]

        def structure(value: Any, _t: Any) -> ComponentSpec:
            if isinstance(value, str) and spec_cls.by_name:  # optimizer = "prodigy"
                value = {TYPE_KEY: value}
            if isinstance(value, Mapping) and TYPE_KEY not in value and spec_cls.default_type:
                value = {TYPE_KEY: spec_cls.default_type, **value}
            if not isinstance(value, Mapping):
                raise _ValueProblem(f"expected a table with a '{TYPE_KEY}' key, got {_describe(value)}")
            if TYPE_KEY not in value:
                raise _ValueProblem(
                    f"missing '{TYPE_KEY}'; choose one of: {', '.join(family.names()) or 'none registered'}"
                )
            name = value[TYPE_KEY]
            if not isinstance(name, str):
                raise _ValueProblem(f"'{TYPE_KEY}' must be a string, got {_describe(name)}")
            comp = family.get(name)  # UnknownComponentError with did-you-mean
            rest = {k: v for k, v in value.items() if k != TYPE_KEY}
            return spec_cls(component=comp, config=conv.structure(rest, comp.config))

        return structure

    conv.register_structure_hook_factory(_is_spec, spec_structure_factory)
    conv.register_structure_hook_factory(lambda t: is_sequence(t) and typing.get_origin(t) is not tuple, _strict_list(conv))
    conv.register_structure_hook_factory(is_mapping, _strict_mapping(conv))

    def attrs_unstructure_factory(cls: type):
        overrides = {name: override(rename=key) for name, key in _renames(cls).items()}
        return make_dict_unstructure_fn(cls, conv, **overrides)

    conv.register_unstructure_hook_factory(lambda t: attrs.has(t) and not _is_spec(t), attrs_unstructure_factory)
    conv.register_unstructure_hook_factory(
        _is_spec, lambda _cls: lambda spec: {TYPE_KEY: spec.name, **conv.unstructure(spec.config)}
    )
    return conv


_QUOTED_FIELD = re.compile(r"^'([A-Za-z_][A-Za-z0-9_]*)' ")


def _field_of(exc: BaseException, cls: Optional[type] = None) -> Optional[attrs.Attribute]:
    """The attrs field a validator error is about.

    attrs' ``in_`` and our validators pass the field as the second argument; its number
    validators (``ge``, ``lt``...) only name it, quoted, at the start of the message.
    """
    args = getattr(exc, "args", ())
    if len(args) > 1 and isinstance(args[1], attrs.Attribute):
        return args[1]
    if cls is not None and args and isinstance(args[0], str) and (m := _QUOTED_FIELD.match(args[0])):
        return getattr(attrs.fields(cls), m.group(1), None)
    return None


def _noted(exc: BaseException, cls: type) -> BaseException:
    field = _field_of(exc, cls)
    assert field is not None
    key = _renames(cls).get(field.name, field.name)
    exc.__notes__ = [cattrs.errors.AttributeValidationNote(f"@ {key}", key, field.type)]
    return exc


def _attach_validator_fields(group: ClassValidationError, cls: type) -> None:
    """cattrs wraps errors raised in ``__init__`` (attrs validators) without a field: add it."""
    for sub in group.exceptions:
        notes = getattr(sub, "__notes__", None) or []
        if not any(isinstance(n, cattrs.errors.AttributeValidationNote) for n in notes) and _field_of(sub, cls) is not None:
            _noted(sub, cls)


_SCALARS = (int, float, str, bool)


def _is_scalar(t: Any) -> bool:
    """int, float, str, bool, or a Union/Optional of them (fields whose validators need no instance)."""
    if t in _SCALARS:
        return True
    args = typing.get_args(t) if typing.get_origin(t) is Union else ()
    return bool(args) and all(a in _SCALARS or a is type(None) for a in args)


def _other_scalar_problems(conv: cattrs.Converter, cls: type, value: Mapping[str, Any],
                           group: ClassValidationError) -> List[BaseException]:
    """Validator failures of ``cls``'s scalar fields that ``group`` does not report yet.

    attrs stops at the first failing validator, and never runs any when a field failed to
    structure; checking each scalar field on its own reports every bad value at once.
    """
    reported = set()
    for sub in group.exceptions:
        for note in getattr(sub, "__notes__", None) or []:
            if isinstance(note, cattrs.errors.AttributeValidationNote):
                reported.add(note.name)
    renames = _renames(cls)
    out: List[BaseException] = []
    for field in attrs.fields(cls):
        key = renames.get(field.name, field.name)
        if field.validator is None or key in reported or key not in value or not _is_scalar(field.type):
            continue
        try:
            field.validator(None, field, conv.structure(value[key], field.type))
        except ValueError as exc:
            if _field_of(exc, cls) is not None:
                out.append(_noted(exc, cls))
        except Exception:  # noqa: BLE001 - a plugin validator that needs the instance: attrs reports it
            continue
    return out


def _strict_list(conv: cattrs.Converter):
    def factory(t: Any):
        inner = list_structure_factory(t, conv)

        def structure(value: Any, _t: Any) -> Any:
            # cattrs would iterate a string into characters: "a cat" -> ['a', ' ', 'c', ...].
            if not isinstance(value, (list, tuple)):
                raise _ValueProblem(f"expected a list, got {_describe(value)}")
            return inner(value, t)

        return structure

    return factory


def _strict_mapping(conv: cattrs.Converter):
    def factory(t: Any):
        inner = conv.gen_structure_mapping(t)

        def structure(value: Any, _t: Any) -> Any:
            if not isinstance(value, Mapping):
                raise _ValueProblem(f"expected a table, got {_describe(value)}")
            return inner(value, t)

        return structure

    return factory


def _is_spec(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, ComponentSpec)


def _dotted(path: str) -> str:
    """``$.data['ds1'].sources[0].x`` -> ``data.ds1.sources[0].x``."""
    out = path[1:] if path.startswith("$") else path
    out = out.replace("['", ".").replace("']", "")
    return out.lstrip(".") or "(top level)"


def _format(exc: BaseException) -> str:
    if isinstance(exc, (_ValueProblem, UserError)):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, (ValueError, TypeError)):
        msg = str(exc.args[0]) if exc.args else str(exc)
        return msg
    return f"{type(exc).__name__}: {exc}"


def _messages(exc: BaseException, path: str = "$") -> List[str]:
    """Flatten cattrs' exception groups into one line per problem, each with its path."""
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        parts = [(sub, f"{path}.{note.name}") for sub, note in with_notes]
    elif isinstance(exc, IterableValidationError):
        with_notes, without = exc.group_exceptions()
        parts = [(sub, f"{path}[{note.index!r}]") for sub, note in with_notes]
    else:
        return [_one(exc, path)]
    out: List[str] = []
    for sub, sub_path in parts + [(sub, path) for sub in without]:
        out.extend(_messages(sub, sub_path))
    return out


def _one(exc: BaseException, path: str) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        known = toml_keys(exc.cl) if attrs.has(exc.cl) else []
        lines = []
        for key in sorted(exc.extra_fields):
            where = _dotted(f"{path}.{key}")
            lines.append(f"{where}: unknown key.{did_you_mean(key, known)} Allowed here: {', '.join(known)}.")
        return "\n".join(lines)
    return f"{_dotted(path)}: {_format(exc)}"


def structure(conv: cattrs.Converter, data: Any, cls: Any, path: str = "") -> Any:
    """Structure ``data`` into ``cls``; any failure becomes one ConfigError listing every problem."""
    try:
        return conv.structure(data, cls)
    except (ClassValidationError, IterableValidationError, _ValueProblem, UnknownComponentError) as exc:
        root = "$" + (f".{path}" if path else "")
        raise ConfigError("invalid config:\n  " + "\n  ".join(_messages(exc, root))) from exc


def unstructure(conv: cattrs.Converter, obj: Any) -> Any:
    """The plain-data (TOML-ready) form of a structured config."""
    return conv.unstructure(obj)
