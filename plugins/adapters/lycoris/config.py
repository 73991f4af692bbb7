"""What a ``[[lycoris_unet]]`` / ``[[lycoris_text_encoder]]`` ... group and the ``[lycoris]`` table hold.

Light on purpose (attrs only, no torch): plugin discovery imports it.
"""
from __future__ import annotations

from typing import Any, List, Optional

import attrs

from hcp_core.config.validators import at_least, fail, in_range, one_of

from ..lora.config import MAX_ALPHA, MAX_RANK, SAVE_DTYPES, _check_init_from, _check_layers

ALGOS = ("loha", "lokr")
#: LoKr's factor splits each dimension into two; beyond this the second factor is tiny anyway.
MAX_FACTOR = 65536


def _check_rank(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        fail(attribute, f"must be an integer between 1 and {MAX_RANK}, got {value!r}")


def _lokr_only(default: Any):  # type: ignore[no-untyped-def]
    """A validator refusing a LoKr option set on another algorithm (a likely mix-up)."""

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value != default and inst.algo != "lokr":
            fail(attribute, f"is a LoKr option (algo = \"lokr\"); this group has algo = {inst.algo!r}, so leave it out")

    return check


def _check_factor(inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or 1 <= value <= MAX_FACTOR):
        fail(attribute, f"must be -1 (split each dimension into its two most balanced factors) or an integer between "
                        f"1 and {MAX_FACTOR} (the size of the first Kronecker factor, as in LyCORIS), got {value!r}")


@attrs.define
class LycorisGroupConfig:
    """One LoHa or LoKr group: which layers, the algorithm and its options, the learning rate.

    LoHa: ``dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank`` (``*`` elementwise).
    LoKr: ``dW = kron(w1, w2) * alpha / rank``, ``w2 = w2_a @ w2_b`` when low-rank (see docs/lycoris.md).
    """

    algo: str = attrs.field(validator=one_of(ALGOS))
    #: As for LoRA: module names or ``re:`` patterns; left out, the family's default layers.
    layers: Optional[List[str]] = attrs.field(default=None, validator=_check_layers)
    lr: float = attrs.field(default=1e-4, validator=at_least(0))
    #: LoHa: the rank of each of its two pairs. LoKr: the rank of its low-rank factor(s); a factor
    #: whose sides are both at most 2 * rank is kept as a full matrix, as LyCORIS does.
    rank: int = attrs.field(default=4, validator=_check_rank)
    #: Scale = alpha / rank (LoKr with no low-rank factor: scale 1, as in LyCORIS).
    alpha: float = attrs.field(default=1.0, validator=in_range(0, MAX_ALPHA, low_open=True))
    dropout: float = attrs.field(default=0.0, validator=in_range(0, 1, high_open=True))
    #: LoKr: ``-1`` splits each of out/in into its most balanced factor pair; ``f > 0`` makes the
    #: first (small) Kronecker factor ``f`` wide where ``f`` divides the size (else the nearest divisor below).
    factor: int = attrs.field(default=-1, validator=[_check_factor, _lokr_only(-1)])
    #: LoKr: also write the first (small) factor as a low-rank product ``w1_a @ w1_b`` when it is large enough.
    decompose_both: bool = attrs.field(default=False, validator=_lokr_only(False))
    #: LoKr: keep the second factor a full matrix whatever the rank.
    full_matrix: bool = attrs.field(default=False, validator=_lokr_only(False))
    #: A LyCORIS .safetensors file whose layers (of this group's algorithm) seed this group.
    init_from: Optional[str] = attrs.field(default=None, validator=_check_init_from)


@attrs.define
class LycorisOptions:
    """The ``[lycoris]`` table: how LoHa / LoKr files are written."""

    #: Tensor type of the exported file.
    save_dtype: str = attrs.field(default="float32", validator=one_of(SAVE_DTYPES))
