"""Small attrs validators shared by the core's config classes and the plugins' ones.

Each raises ``ValueError(message, attribute)``: the config converter (:mod:`.convert`) turns that
into one line ``dotted.key: message`` naming the bad value and what is allowed, e.g.
``data.ds1.batch_size: must be between 1 and 4096, got 0``.

Every validator lets ``None`` through (an ``Optional`` field that is not set); whether a value is
required is the field's type's business. Number ranges also refuse NaN and infinities, which
compare false with everything and would otherwise slip past a plain ``<`` check.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NoReturn, Optional, Sequence

import attrs

#: What attrs calls a validator with: the instance, the field, the value.
Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

#: numpy's (and so accelerate's ``set_seed``'s) largest seed is 2**32 - 1.
MAX_SEED = 2**32 - 1


def fail(attribute: "attrs.Attribute[Any]", message: str) -> NoReturn:
    """Raise the error the converter reports as ``<dotted key>: <message>``."""
    raise ValueError(message, attribute)


def _num(x: float) -> str:
    """A bound as users write it: ``1`` not ``1.0``, ``0.5`` as is."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def describe_range(low: Optional[float] = None, high: Optional[float] = None, *,
                   low_open: bool = False, high_open: bool = False) -> str:
    """The allowed range in words: ``at least 1``, ``between 1 and 20``, ``in [0, 1)``, ..."""
    if low is not None and high is not None:
        if not low_open and not high_open:
            return f"between {_num(low)} and {_num(high)}"
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"greater than {_num(low)}" if low_open else f"at least {_num(low)}"
    if high is not None:
        return f"less than {_num(high)}" if high_open else f"at most {_num(high)}"
    return "a finite number"


def is_finite_number(value: Any) -> bool:
    """True for an int, or a float that is neither NaN nor infinite (bools are not numbers here)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def in_range(low: Optional[float] = None, high: Optional[float] = None, *,
             low_open: bool = False, high_open: bool = False) -> Validator:
    """A finite number within [low, high] (``low_open``/``high_open`` exclude that end; None: unbounded).

    Messages: ``must be between 1 and 20, got 50``; a NaN or an infinity gets
    ``must be a finite number (between 1 and 20), got nan``.
    """
    allowed = describe_range(low, high, low_open=low_open, high_open=high_open)

    def check(inst: Any, attribute: "attrs.Attribute[Any]", value: Any) -> None:
        if value is None:
            return
        if not is_finite_number(value):
            fail(attribute, f"must be a finite number ({allowed}), got {value!r}"
                 if low is not None or high is not None else f"must be a finite number, got {value!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            fail(attribute, f"must be {allowed}, got {value!r}")

    return check


def at_least(low: float) -> Validator:
    """A finite number >= ``low``: ``must be at least 1, got 0``."""
    return in_range(low)


def greater_than(low: float) -> Validator:
    """A finite number > ``low``: ``must be greater than 0, got 0``."""
    return in_range(low, low_open=True)


def finite() -> Validator:
    """Any finite number (refuses NaN and infinities)."""
    return in_range()


#: A seed: numpy (seeded by accelerate) takes 0 .. 2**32 - 1.
seed_in_range: Validator = in_range(0, MAX_SEED)


def one_of(options: Sequence[Any]) -> Validator:
    """One of ``options``: ``must be one of 'no', 'fp16', 'bf16', got 'fp17'``."""
    listed = ", ".join(repr(o) for o in options)

    def check(inst: Any, attribute: "attrs.Attribute[Any]", value: Any) -> None:
        if value is not None and value not in options:
            fail(attribute, f"must be one of {listed}, got {value!r}")

    return check


def not_blank(inst: Any, attribute: "attrs.Attribute[Any]", value: Optional[str]) -> None:
    """A string with something besides white space in it."""
    if value is not None and not value.strip():
        fail(attribute, f"must not be empty or blank, got {value!r}")


def each(validator: Validator) -> Validator:
    """Apply ``validator`` to every item of a list or tuple; the message says which item failed.

    ``betas = [2, -1]`` -> ``item 0 of [2.0, -1.0] must be in [0, 1), got 2.0``.
    """

    def check(inst: Any, attribute: "attrs.Attribute[Any]", value: Any) -> None:
        if value is None:
            return
        for i, item in enumerate(value):
            try:
                validator(inst, attribute, item)
            except ValueError as exc:
                fail(attribute, f"item {i} of {list(value)!r} {exc.args[0]}")

    return check
